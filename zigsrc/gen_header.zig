//! Renders kvmlab.h from zigsrc/capi.zig. Run by `zig build` (see build.zig);
//! the header has no preprocessor lines so cffi's cdef can read it as is.
pub fn main() void {}
