//! A batch of variable-length sequences packed end to end.
#![forbid(unsafe_code)]

/// Sequences packed end to end, no padding.
/// Sequence `i` is `ids[cu_seqlens[i]..cu_seqlens[i + 1]]` (with its `type_ids`).
#[derive(Debug, Clone, Default)]
pub struct PackedBatch {
    pub ids: Vec<u32>,
    pub type_ids: Vec<u32>,
    pub cu_seqlens: Vec<u32>,
}

impl PackedBatch {
    pub fn new() -> Self {
        Self {
            cu_seqlens: vec![0],
            ..Default::default()
        }
    }
    pub fn push(&mut self, ids: &[u32], type_ids: &[u32]) {
        debug_assert_eq!(ids.len(), type_ids.len());
        self.ids.extend_from_slice(ids);
        self.type_ids.extend_from_slice(type_ids);
        self.cu_seqlens.push(self.ids.len() as u32);
    }
    pub fn len(&self) -> usize {
        self.cu_seqlens.len().saturating_sub(1)
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn tokens(&self) -> usize {
        self.ids.len()
    }
    pub fn seq(&self, i: usize) -> std::ops::Range<usize> {
        self.cu_seqlens[i] as usize..self.cu_seqlens[i + 1] as usize
    }
}
