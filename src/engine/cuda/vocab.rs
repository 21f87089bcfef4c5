//! The WordPiece vocabulary on the GPU, for the GPU tokenizer (gpu-check and the GPU tests;
//! the server tokenizes on the CPU).
use anyhow::{ensure, Context, Result};
use cudarc::driver::{CudaSlice, PushKernelArg};

use super::gpu::*;
use crate::model::wordpiece::WordPieceTable;

pub struct DeviceVocab {
    pub(crate) table: WordPieceTable,
    pub(crate) slots: CudaSlice<u32>,
    pub(crate) entries: CudaSlice<u32>,
    pub(crate) bytes: CudaSlice<u8>,
    pub(crate) text: Option<(CudaSlice<u8>, CudaSlice<u32>, CudaSlice<u8>)>,
}

impl DeviceVocab {
    pub(crate) fn upload(gpu: &Gpu, table: &WordPieceTable) -> Result<Self> {
        ensure!(
            table.slots.len().is_power_of_two() && table.slots.len() <= u32::MAX as usize,
            "vocabulary table size {} is not a power of two",
            table.slots.len()
        );
        let flat: Vec<u32> = table.entries.iter().flatten().copied().collect();
        Ok(DeviceVocab {
            slots: gpu.upload(&table.slots)?,
            entries: gpu.upload(&flat)?,
            bytes: gpu.upload(&table.bytes)?,
            table: table.clone(),
            text: None,
        })
    }

    /// Token ids of each text without special tokens; `None` for a text the GPU path
    /// declines (non-ASCII, added-token literals: see `WordPieceTable::accepts`).
    pub(crate) fn tokenize(&mut self, gpu: &Gpu, texts: &[&str]) -> Result<Vec<Option<Vec<u32>>>> {
        let (buf, spans) = self.table.pack(texts);
        let n = buf.len();
        if n == 0 {
            return Ok(WordPieceTable::stitch(&spans, &[], &[]));
        }
        if self.text.as_ref().is_none_or(|t| t.0.len() < n) {
            let cap = n.next_power_of_two().max(1 << 16);
            self.text = None;
            self.text = Some((gpu.zeros(cap)?, gpu.zeros(cap)?, gpu.zeros(cap)?));
        }
        let (text, ids, counts) = self.text.as_mut().context("tokenizer buffers missing")?;
        drv(
            "copying text to the GPU",
            gpu.stream.memcpy_htod(&buf, &mut text.slice_mut(..n)),
        )?;
        let (n64, mask, unk, max_chars, max_piece) = (
            n as u64,
            (self.table.slots.len() - 1) as u32,
            self.table.unk,
            self.table.max_chars as i32,
            self.table.max_piece.min(i32::MAX as u32) as i32,
        );
        let mut b = gpu.stream.launch_builder(&gpu.wordpiece);
        b.arg(&*text).arg(&n64).arg(&self.slots).arg(&mask);
        b.arg(&self.entries)
            .arg(&self.bytes)
            .arg(&unk)
            .arg(&max_chars)
            .arg(&max_piece);
        b.arg(&mut *ids).arg(&mut *counts);
        // SAFETY: text/ids/counts hold at least n elements; the table arrays are the ones
        // `WordPieceTable` built (slots a power of two, at most half full, so probing ends;
        // entries index into bytes).
        drv("wordpiece_ascii", unsafe {
            b.launch(cfg1(n.div_ceil(256) as u32, 256))
        })?;
        let ids = gpu.download(ids, n)?;
        let counts = gpu.download(counts, n)?;
        Ok(WordPieceTable::stitch(&spans, &ids, &counts))
    }
}
