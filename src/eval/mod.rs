//! Offline work on the routing data: reading rows, embedding them (`embed`), training heads,
//! scoring and calibrating (`score`, `adapt`), replaying datasets.
pub mod adapt;
pub mod benchmarks;
pub mod calibrate;
pub mod calibrate_int8;
pub mod consensus;
pub mod data;
pub mod distill_static;
pub mod embed;
pub mod fit;
pub mod knn;
pub mod plot;
pub mod recommend;
pub mod replay;
pub mod score;
pub mod train;
pub mod util;
