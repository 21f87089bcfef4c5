//! TLS on the gRPC listener (rustls on ring), mutual TLS when a client CA is configured.
//! The PEM files are watched: each new connection uses the configuration read from them
//! last, re-read when a file's modification time or size has changed (looked at no more than
//! every [`CHECK_EVERY`]), so a rotated certificate (a Kubernetes Secret update, cert-manager)
//! serves new connections without a restart. A rotation that does not load (a half-written
//! pair) is logged and the previous certificate kept.
#![forbid(unsafe_code)]
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;

use crate::config::TlsConfig;

/// How often the files are looked at (on a new connection, not on a timer).
pub const CHECK_EVERY: Duration = Duration::from_secs(2);
/// A client that has not finished its handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once; beyond it accepting waits (a bounded backlog).
const MAX_HANDSHAKES: usize = 256;

/// The files' modification time and size, or `None` where one cannot be read.
type Stamp = Option<(SystemTime, u64)>;

pub struct ReloadingTls {
    files: TlsConfig,
    state: Mutex<State>,
}

struct State {
    config: Arc<ServerConfig>,
    stamps: Vec<Stamp>,
    checked: Instant,
}

impl ReloadingTls {
    /// Reads the files once; any problem stops start-up with the file named.
    pub fn load(files: &TlsConfig) -> Result<ReloadingTls> {
        let stamps = stamps(files);
        let config = server_config(files)?;
        Ok(ReloadingTls {
            files: files.clone(),
            state: Mutex::new(State {
                config,
                stamps,
                checked: Instant::now(),
            }),
        })
    }

    /// The configuration for a new connection, re-read first if the files changed.
    pub fn current(&self) -> Arc<ServerConfig> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.checked.elapsed() >= CHECK_EVERY {
            st.checked = Instant::now();
            let now = stamps(&self.files);
            if now != st.stamps {
                // Remembered either way: a bad rotation is reported once, and the next
                // write to any of the files is tried again.
                st.stamps = now;
                match server_config(&self.files) {
                    Ok(c) => {
                        st.config = c;
                        tracing::info!(cert = %self.files.cert_file.display(), "TLS certificate reloaded");
                    }
                    Err(e) => tracing::error!(
                        error = format!("{e:#}"),
                        "TLS files changed but do not load; serving the previous certificate"
                    ),
                }
            }
        }
        st.config.clone()
    }
}

fn paths(f: &TlsConfig) -> impl Iterator<Item = &Path> {
    [f.cert_file.as_path(), f.key_file.as_path()]
        .into_iter()
        .chain(f.client_ca_file.as_deref())
}

fn stamps(f: &TlsConfig) -> Vec<Stamp> {
    // `metadata` follows symlinks: a Secret volume swaps its `..data` link on update.
    paths(f)
        .map(|p| {
            let m = std::fs::metadata(p).ok()?;
            Some((m.modified().ok()?, m.len()))
        })
        .collect()
}

fn certs(p: &PathBuf, key: &str) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(p)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("tls.{key}: reading PEM certificates from {}", p.display()))?;
    if certs.is_empty() {
        bail!(
            "tls.{key}: {} holds no `BEGIN CERTIFICATE` block",
            p.display()
        );
    }
    Ok(certs)
}

/// A rustls configuration from the files: the chain and key, and client verification
/// against the CA when one is given. HTTP/2 only (ALPN `h2`), as gRPC clients ask.
pub fn server_config(f: &TlsConfig) -> Result<Arc<ServerConfig>> {
    let chain = certs(&f.cert_file, "cert_file")?;
    let key = PrivateKeyDer::from_pem_file(&f.key_file).with_context(|| {
        format!(
            "tls.key_file: reading a PEM private key from {}",
            f.key_file.display()
        )
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("tls: protocol versions")?;
    let builder = match &f.client_ca_file {
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for c in certs(ca, "client_ca_file")? {
                roots.add(c).with_context(|| {
                    format!("tls.client_ca_file: a certificate in {}", ca.display())
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .context("tls.client_ca_file: client verifier")?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(chain, key).with_context(|| {
        format!(
            "tls: the key in {} does not fit the certificate in {}",
            f.key_file.display(),
            f.cert_file.display()
        )
    })?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// Accepted connections after their TLS handshake, for tonic's `serve_with_incoming`. A
/// failed handshake (a plaintext client, an unknown client certificate) closes that
/// connection only. Accepting stops when the server drops the stream.
pub fn incoming(
    listener: TcpListener,
    tls: Arc<ReloadingTls>,
) -> ReceiverStream<std::io::Result<TlsStream<TcpStream>>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = tokio::select! {
                _ = tx.closed() => break,
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        // Out of file descriptors and the like: pause rather than spin.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let Ok(slot) = slots.clone().acquire_owned().await else {
                break;
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = TlsAcceptor::from(tls.current());
            let tx = tx.clone();
            tokio::spawn(async move {
                let _slot = slot;
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(s)) => {
                        let _ = tx.send(Ok(s)).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}
