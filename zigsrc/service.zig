//! vm.call()'s side of the service protocol (guests/service_protocol.zig):
//! the request written, and after the run the answer read, within the one
//! native call kvmlab_vm_call makes of a call (the Python-side reads and
//! writes it replaces measured several us each with the cold caches of a
//! run). Through Machine's reads and writes: SIGBUS-safe on map-restored
//! VMs, and a reset sees the pages written.
const std = @import("std");
const errors = @import("errors.zig");
const machine = @import("machine.zig");
pub const protocol = @import("guests/service_protocol.zig");

const Header = protocol.Header;

/// Writes a request for `op` with `payload`; returns its sequence number
/// (the guest's last one + 1: a restored guest goes on from its snapshot's).
pub fn send(m: *machine.Machine, op: u32, payload: []const u8) errors.Error!u32 {
    std.debug.assert(payload.len <= protocol.max_bytes);
    var hdr: Header = undefined;
    try m.readMemory(protocol.header_gpa, std.mem.asBytes(&hdr));
    const seq = hdr.req_seq +% 1;
    try m.writeMemory(protocol.request_gpa, payload);
    hdr = .{ .req_len = @intCast(payload.len), .resp_len = 0, .req_seq = seq, .resp_seq = 0, .opcode = op, .status = 0 };
    try m.writeMemory(protocol.header_gpa, std.mem.asBytes(&hdr));
    return seq;
}

pub const Answer = struct {
    /// The guest wrote the answer to this request (resp_seq matches and the
    /// length is within max_bytes); otherwise it answered out of protocol.
    in_sequence: bool,
    /// Answer bytes copied (at most the buffer's length).
    bytes: u32,
    status: u32,
};

/// After a run that stopped at the service checkpoint: the answer to request
/// `seq`, copied into `out`.
pub fn receive(m: *machine.Machine, seq: u32, out: []u8) errors.Error!Answer {
    var hdr: Header = undefined;
    try m.readMemory(protocol.header_gpa, std.mem.asBytes(&hdr));
    if (hdr.resp_seq != seq or hdr.resp_len > protocol.max_bytes) return .{ .in_sequence = false, .bytes = 0, .status = hdr.status };
    const n: u32 = @intCast(@min(hdr.resp_len, out.len));
    try m.readMemory(protocol.response_gpa, out[0..n]);
    return .{ .in_sequence = true, .bytes = n, .status = hdr.status };
}
