//! service: a request/response server driven by checkpoints (used by
//! PooledRestoreVm.call()). See docs/guest-protocol.md ("Service area").
//!
//! vCPU 0 prints `service ready\n`, then forever: checkpoint with tag 0x5e5e0001
//! (the host writes a request meanwhile), read the header at 0x4000 and the
//! payload at 0x5000, write the response payload at 0x6000, then the response
//! length, the status and finally the response sequence number (copied from the
//! request). Any other vCPU exits 0 at once.
const rt = @import("rt.zig");

pub const panic = rt.panic;

comptime {
    rt.exportEntry(main);
}

const protocol = @import("service_protocol.zig");
const Header = protocol.Header;
const max_len = protocol.max_bytes;
const status_ok: u32 = @intFromEnum(protocol.Status.ok);
const status_bad_opcode: u32 = @intFromEnum(protocol.Status.bad_opcode);
const status_truncated: u32 = @intFromEnum(protocol.Status.truncated);
const op_echo: u32 = @intFromEnum(protocol.Op.echo);
const op_crc32c: u32 = @intFromEnum(protocol.Op.crc32c);
const op_reverse: u32 = @intFromEnum(protocol.Op.reverse);

fn serve(hdr: *volatile Header) void {
    var status = status_ok;
    var len = hdr.req_len;
    if (len > max_len) {
        len = max_len;
        status = status_truncated;
    }
    const req = @as([*]const u8, @ptrFromInt(protocol.request_gpa))[0..len];
    const resp: [*]u8 = @ptrFromInt(protocol.response_gpa);

    var resp_len: u32 = 0;
    switch (hdr.opcode) {
        op_echo => {
            for (req, 0..) |b, i| resp[i] = b;
            resp_len = len;
        },
        op_crc32c => {
            const crc = rt.crc32c(req);
            resp[0] = @truncate(crc);
            resp[1] = @truncate(crc >> 8);
            resp[2] = @truncate(crc >> 16);
            resp[3] = @truncate(crc >> 24);
            resp_len = 4;
        },
        op_reverse => {
            for (req, 0..) |b, i| resp[len - 1 - i] = b;
            resp_len = len;
        },
        else => status = status_bad_opcode,
    }
    // The payload is written with ordinary stores; the checkpoint `out` that
    // follows carries a memory clobber, so it is all in memory before the host
    // looks. The sequence number goes last.
    hdr.resp_len = resp_len;
    hdr.status = status;
    hdr.resp_seq = hdr.req_seq;
}

fn main(vcpu: u64) noreturn {
    if (vcpu != 0) rt.exit(0);
    rt.write("service ready\n");
    const hdr: *volatile Header = @ptrFromInt(protocol.header_gpa);
    while (true) {
        rt.checkpoint(protocol.wait_tag);
        serve(hdr);
    }
}
