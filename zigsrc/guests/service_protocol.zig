//! The service protocol (docs/guest-protocol.md, "Service area"): its one
//! definition, used by both sides: the built-in service guest
//! (guests/service.zig) and the host's call (service.zig, vm.call()), and by
//! Python through the generated header (kvmlab_service_*). No imports: the
//! guests are freestanding.

/// The header the host writes a request into and the guest its answer.
pub const header_gpa: u64 = 0x4000;
/// The request payload (the host's), and the response payload (the guest's).
pub const request_gpa: u64 = 0x5000;
pub const response_gpa: u64 = 0x6000;

/// The guest waits for a request at a checkpoint with this tag; the host's
/// run ends there once the answer is written.
pub const wait_tag: u32 = 0x5e5e0001;
/// Payload bytes at most, each way (one page).
pub const max_bytes: u32 = 4096;

pub const Op = enum(c_int) { echo = 1, crc32c = 2, reverse = 3 };
pub const Status = enum(c_int) { ok = 0, bad_opcode = 1, truncated = 2 };

/// At header_gpa. The host writes req_*, opcode; the guest resp_*, status,
/// resp_seq last (so a matching resp_seq means the answer is complete).
pub const Header = extern struct {
    req_len: u32, // 0x4000, host
    resp_len: u32, // 0x4004, guest
    req_seq: u32, // 0x4008, host
    resp_seq: u32, // 0x400c, guest
    opcode: u32, // 0x4010, host
    status: u32, // 0x4014, guest
};

comptime {
    if (@sizeOf(Header) != 0x18 or request_gpa != header_gpa + 0x1000 or response_gpa != request_gpa + 0x1000)
        @compileError("the service area layout is docs/guest-protocol.md's");
}
