//! A pointer rayon tasks share to write disjoint parts of one output buffer.

/// A raw output pointer shared by rayon tasks that each write a disjoint region of it
/// (`encoder`'s attention, the bf16 GEMM's tiles in `bf16::matmul`).
#[derive(Clone, Copy)]
pub(crate) struct SendPtr(pub(crate) *mut f32);
// SAFETY: the pointer is only dereferenced for disjoint writes by rayon tasks that end
// before the buffer does (the two users named above).
unsafe impl Send for SendPtr {}
// SAFETY: as for Send: no two tasks touch the same element.
unsafe impl Sync for SendPtr {}
impl SendPtr {
    // A method (not field access) so closures capture the whole Send wrapper.
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}
