//! Renders the C headers from zigsrc/capi/*.zig. Run by `zig build` (see
//! build.zig); the headers have no preprocessor lines so cffi's cdef can read
//! them as is. Two export groups: `product` (capi/common, vm, snapshot, pool
//! -> kvmlab.h) and `testing` (capi/testing -> kvmlab_testing.h, which uses
//! kvmlab.h's types and is read after it).
//!
//!   gen_header [--group=testing]            -> the header on stdout
//!   gen_header [--group=testing] --check-c  -> a C file on stdout that includes
//!                            the headers and `_Static_assert`s every struct
//!                            size, field offset and enum value against Zig's
//!                            view (compiled by `zig build test`)
//!
//! What becomes C (every `pub` decl of a group's files whose name starts `kvmlab_`):
//!   - `pub export fn kvmlab_x(...) callconv(.c) R`   -> prototype
//!   - `pub const kvmlab_x = opaque {}`               -> `typedef struct kvmlab_x kvmlab_x;`
//!   - `pub const kvmlab_x = extern struct/union {}`  -> typedef + definition
//!   - `pub const kvmlab_x = enum(c_int) {...}`       -> `typedef enum {...} kvmlab_x;`
//!     constants are KVMLAB_<X>_<TAG> (KVMLAB_<TAG> for kvmlab_result).
//! Types come from reflection (@typeInfo); parameter names and `///` doc
//! comments come from tokenizing the files' source (@embedFile). Anything the
//! generator cannot map faithfully to C is a compile error (or, for source
//! inconsistencies, a non-zero exit), never a guess.
const std = @import("std");

const prefix = "kvmlab_";

/// One file of C ABI declarations.
const Module = struct { decls: type, source: [:0]const u8, path: []const u8 };

const product_modules = [_]Module{
    .{ .decls = @import("capi/common.zig"), .source = @embedFile("capi/common.zig"), .path = "capi/common.zig" },
    .{ .decls = @import("capi/vm.zig"), .source = @embedFile("capi/vm.zig"), .path = "capi/vm.zig" },
    .{ .decls = @import("capi/snapshot.zig"), .source = @embedFile("capi/snapshot.zig"), .path = "capi/snapshot.zig" },
    .{ .decls = @import("capi/pool.zig"), .source = @embedFile("capi/pool.zig"), .path = "capi/pool.zig" },
    .{ .decls = @import("capi/fork.zig"), .source = @embedFile("capi/fork.zig"), .path = "capi/fork.zig" },
};
const testing_modules = [_]Module{
    .{ .decls = @import("capi/testing.zig"), .source = @embedFile("capi/testing.zig"), .path = "capi/testing.zig" },
};
const all_modules = product_modules ++ testing_modules;

pub const Group = enum {
    product,
    testing,

    fn modules(comptime g: Group) []const Module {
        return switch (g) {
            .product => &product_modules,
            .testing => &testing_modules,
        };
    }
    fn headerName(g: Group) []const u8 {
        return switch (g) {
            .product => "kvmlab.h",
            .testing => "kvmlab_testing.h",
        };
    }
};

/// The type declared as `kvmlab_*` `name` in any module.
fn typeByName(comptime name: []const u8) type {
    inline for (all_modules) |m| {
        if (@hasDecl(m.decls, name)) return @field(m.decls, name);
    }
    @compileError("gen_header: no module declares " ++ name);
}

// ---------------------------------------------------------------------------
// Comptime: reflection over capi.zig
// ---------------------------------------------------------------------------

const Kind = enum { @"opaque", @"struct", @"union", @"enum", func };

const Field = struct {
    name: []const u8,
    /// Full C declarator, e.g. `uint64_t regs[4]` or `const uint8_t *image`.
    decl: []const u8,
    /// Zig's view, for the --check-c static asserts.
    offset: usize,
};

const Tag = struct {
    zig_name: []const u8,
    c_name: []const u8,
    value: comptime_int,
};

const Item = struct {
    kind: Kind,
    name: []const u8,
    // struct / union
    fields: []const Field = &.{},
    size: usize = 0,
    // enum
    tags: []const Tag = &.{},
    // func
    ret: []const u8 = "",
    params: []const []const u8 = &.{},
};

fn startsWith(comptime s: []const u8, comptime p: []const u8) bool {
    return s.len >= p.len and std.mem.eql(u8, s[0..p.len], p);
}

fn upper(comptime s: []const u8) []const u8 {
    comptime var buf: [s.len]u8 = undefined;
    inline for (s, 0..) |c, i| buf[i] = std.ascii.toUpper(c);
    const final = buf;
    return &final;
}

fn fail(comptime ctx: []const u8, comptime msg: []const u8, comptime T: type) noreturn {
    @compileError("gen_header: " ++ ctx ++ ": " ++ msg ++ " (Zig type `" ++ @typeName(T) ++
        "`); extend zigsrc/gen_header.zig or change zigsrc/capi/");
}

/// The `kvmlab_*` name under which a capi file declares type `T`, if any.
fn capiName(comptime T: type) ?[]const u8 {
    inline for (all_modules) |m| {
        inline for (@typeInfo(m.decls).@"struct".decl_names) |name| {
            if (comptime startsWith(name, prefix)) {
                const v = @field(m.decls, name);
                if (@TypeOf(v) == type) {
                    if (v == T) return name;
                }
            }
        }
    }
    return null;
}

/// C spelling of a type used as a value (parameter, return, field element,
/// pointee). Pointer types end in `*`.
fn cType(comptime T: type, comptime ctx: []const u8) []const u8 {
    // C's own integer types are distinct Zig types: check them first.
    if (T == c_int) return "int";
    if (T == c_uint) return "unsigned int";
    if (T == c_long) return "long";
    if (T == c_ulong) return "unsigned long";
    if (T == c_longlong) return "long long";
    if (T == c_ulonglong) return "unsigned long long";
    if (T == c_short) return "short";
    if (T == c_ushort) return "unsigned short";
    if (T == c_char) return "char";
    if (T == usize) return "size_t";
    if (T == isize) return "ptrdiff_t";
    switch (@typeInfo(T)) {
        .void => return "void",
        .bool => return "_Bool",
        .int => |info| {
            const bits = info.bits;
            if (bits != 8 and bits != 16 and bits != 32 and bits != 64)
                fail(ctx, "no C type for this integer width", T);
            return (if (info.signedness == .unsigned) "uint" else "int") ++
                std.fmt.comptimePrint("{d}", .{bits}) ++ "_t";
        },
        .float => |info| return switch (info.bits) {
            32 => "float",
            64 => "double",
            else => fail(ctx, "no C type for this float width", T),
        },
        .optional => |info| {
            // Only optional pointers have the C representation of a pointer.
            switch (@typeInfo(info.child)) {
                .pointer => |p| if (p.size == .one or p.size == .many) return cType(info.child, ctx),
                else => {},
            }
            fail(ctx, "optional of a non-pointer has no C representation", T);
        },
        .pointer => |info| {
            if (info.size == .slice) fail(ctx, "slices have no C representation; pass pointer + length", T);
            if (info.attrs.@"volatile") fail(ctx, "volatile pointers are not supported", T);
            if (info.attrs.@"addrspace" != null and info.attrs.@"addrspace".? != .generic) fail(ctx, "pointers with an address space are not supported", T);
            const is_const = info.attrs.@"const";
            const Child = info.child;
            // [*:0]const u8 -> const char *
            if (Child == u8 and info.size != .one) {
                if (info.sentinel()) |s| {
                    if (s != 0) fail(ctx, "only 0-terminated u8 pointers map to char *", T);
                    return (if (is_const) "const char *" else "char *");
                }
            } else if (info.sentinel_ptr != null) {
                fail(ctx, "sentinel-terminated pointers other than [*:0]u8 are not supported", T);
            }
            const pointee: []const u8 = switch (@typeInfo(Child)) {
                .@"opaque" => if (Child == anyopaque)
                    "void"
                else
                    capiName(Child) orelse fail(ctx, "opaque type is not declared as a pub kvmlab_* decl of capi.zig", Child),
                .array => fail(ctx, "pointers to arrays are not supported; use a many-pointer", T),
                .@"fn" => fail(ctx, "function pointers are not supported yet", T),
                .void => fail(ctx, "pointer to void (zero-sized); use *anyopaque", T),
                else => cType(Child, ctx),
            };
            if (pointee[pointee.len - 1] == '*') {
                // pointer to pointer: `kvmlab_vm **`, `kvmlab_vm *const *`
                return pointee ++ (if (is_const) "const *" else "*");
            }
            return (if (is_const) "const " else "") ++ pointee ++ " *";
        },
        .@"struct" => |info| {
            if (info.layout != .@"extern") fail(ctx, "only extern structs have a C layout", T);
            return capiName(T) orelse fail(ctx, "extern struct is not declared as a pub kvmlab_* decl of capi.zig", T);
        },
        .@"union" => |info| {
            if (info.layout != .@"extern") fail(ctx, "only extern unions have a C layout", T);
            return capiName(T) orelse fail(ctx, "extern union is not declared as a pub kvmlab_* decl of capi.zig", T);
        },
        .@"enum" => |info| {
            if (info.tag_type != c_int) fail(ctx, "only enum(c_int) maps to a C enum", T);
            return capiName(T) orelse fail(ctx, "enum is not declared as a pub kvmlab_* decl of capi.zig", T);
        },
        .array => fail(ctx, "arrays are only supported as struct fields", T),
        else => fail(ctx, "cannot map this type to C", T),
    }
}

/// Full C declarator of `name` with type `T` (arrays: `T name[N]`).
fn cDecl(comptime T: type, comptime name: []const u8, comptime ctx: []const u8) []const u8 {
    switch (@typeInfo(T)) {
        .array => |info| {
            if (info.sentinel_ptr != null) fail(ctx, "sentinel-terminated arrays are not supported", T);
            if (info.len == 0) fail(ctx, "zero-length arrays are not supported", T);
            return cDecl(info.child, name ++ std.fmt.comptimePrint("[{d}]", .{info.len}), ctx);
        },
        .void => fail(ctx, "void is only valid as a return type", T),
        else => {
            const t = cType(T, ctx);
            return t ++ (if (t[t.len - 1] == '*') "" else " ") ++ name;
        },
    }
}

/// By-value dependencies of a struct/union on other capi structs/unions
/// (pointers only need the forward typedef).
fn valueDeps(comptime T: type) []const []const u8 {
    comptime var deps: []const []const u8 = &.{};
    const field_types = switch (@typeInfo(T)) {
        .@"struct" => |s| s.field_types,
        .@"union" => |u| u.field_types,
        else => return deps,
    };
    inline for (field_types) |FT| {
        comptime var E = FT;
        while (@typeInfo(E) == .array) E = @typeInfo(E).array.child;
        switch (@typeInfo(E)) {
            .@"struct", .@"union" => if (capiName(E)) |n| {
                deps = deps ++ [_][]const u8{n};
            },
            else => {},
        }
    }
    return deps;
}

fn enumPrefix(comptime name: []const u8) []const u8 {
    // kvmlab_result's constants are the ABI's status codes: KVMLAB_OK, ...
    if (std.mem.eql(u8, name, "kvmlab_result")) return "KVMLAB_";
    return upper(name) ++ "_";
}

fn typeItem(comptime name: []const u8, comptime T: type) Item {
    const ctx = "capi." ++ name;
    switch (@typeInfo(T)) {
        .@"opaque" => return .{ .kind = .@"opaque", .name = name },
        .@"struct", .@"union" => {
            const is_struct = @typeInfo(T) == .@"struct";
            const names = if (is_struct) @typeInfo(T).@"struct".field_names else @typeInfo(T).@"union".field_names;
            const types = if (is_struct) @typeInfo(T).@"struct".field_types else @typeInfo(T).@"union".field_types;
            if (is_struct) {
                const info = @typeInfo(T).@"struct";
                if (info.layout != .@"extern") fail(ctx, "kvmlab_* structs must be extern structs", T);
                if (info.is_tuple) fail(ctx, "tuples have no C representation", T);
                for (info.field_attrs) |a| {
                    if (a.@"align" != null) fail(ctx, "explicit field alignment cannot be expressed in the header", T);
                    if (a.@"comptime") fail(ctx, "comptime fields have no C representation", T);
                }
            } else {
                const info = @typeInfo(T).@"union";
                if (info.layout != .@"extern") fail(ctx, "kvmlab_* unions must be extern unions", T);
                for (info.field_attrs) |a| {
                    if (a.@"align" != null) fail(ctx, "explicit field alignment cannot be expressed in the header", T);
                }
            }
            if (names.len == 0) fail(ctx, "empty structs/unions are not valid C", T);
            comptime var fields: []const Field = &.{};
            inline for (names, types) |fname, FT| {
                fields = fields ++ [_]Field{.{
                    .name = fname,
                    .decl = cDecl(FT, fname, ctx ++ "." ++ fname),
                    .offset = @offsetOf(T, fname),
                }};
            }
            return .{
                .kind = if (is_struct) .@"struct" else .@"union",
                .name = name,
                .fields = fields,
                .size = @sizeOf(T),
            };
        },
        .@"enum" => |info| {
            if (info.tag_type != c_int) fail(ctx, "kvmlab_* enums must be enum(c_int)", T);
            if (info.field_names.len == 0) fail(ctx, "empty enums are not valid C", T);
            comptime var tags: []const Tag = &.{};
            inline for (info.field_names, info.field_values) |tname, value| {
                tags = tags ++ [_]Tag{.{ .zig_name = tname, .c_name = enumPrefix(name) ++ upper(tname), .value = value }};
            }
            return .{ .kind = .@"enum", .name = name, .tags = tags };
        },
        else => fail(ctx, "a kvmlab_* type must be an opaque, extern struct/union or enum(c_int)", T),
    }
}

fn funcItem(comptime name: []const u8, comptime F: type) Item {
    const ctx = "capi." ++ name;
    const info = @typeInfo(F).@"fn";
    if (!info.attrs.@"callconv".eql(.c)) fail(ctx, "exported functions must be callconv(.c)", F);
    if (info.attrs.varargs) fail(ctx, "varargs functions are not supported", F);
    if (info.is_generic) fail(ctx, "generic functions cannot be exported", F);
    const R = info.return_type orelse fail(ctx, "generic return type", F);
    switch (@typeInfo(R)) {
        .array => fail(ctx, "functions cannot return arrays in C", R),
        .noreturn => fail(ctx, "noreturn functions are not supported", R),
        else => {},
    }
    comptime var params: []const []const u8 = &.{};
    inline for (info.param_types, 0..) |maybe_P, i| {
        const pctx = ctx ++ std.fmt.comptimePrint(" parameter {d}", .{i + 1});
        const P = maybe_P orelse fail(pctx, "anytype/generic parameter", F);
        if (@typeInfo(P) == .array) fail(pctx, "arrays cannot be passed by value in C", P);
        if (@typeInfo(P) == .void) fail(pctx, "void parameter", P);
        params = params ++ [_][]const u8{cType(P, pctx)};
    }
    return .{ .kind = .func, .name = name, .ret = cType(R, ctx ++ " return type"), .params = params };
}

/// Every kvmlab_* pub decl of a group, types in dependency order (by-value
/// struct nesting), then functions, each in declaration order.
fn itemsOf(comptime g: Group) []const Item {
    return comptime blk: {
    @setEvalBranchQuota(1_000_000);
    var types: []const Item = &.{};
    var funcs: []const Item = &.{};
    for (g.modules()) |m| for (@typeInfo(m.decls).@"struct".decl_names) |name| {
        if (!startsWith(name, prefix)) continue;
        const v = @field(m.decls, name);
        const V = @TypeOf(v);
        if (V == type) {
            types = types ++ [_]Item{typeItem(name, v)};
        } else if (@typeInfo(V) == .@"fn") {
            funcs = funcs ++ [_]Item{funcItem(name, V)};
        } else {
            fail("capi." ++ name, "a pub kvmlab_* decl must be a type or an exported function", V);
        }
    };
    // Order struct/union definitions so by-value members come first.
    var ordered: []const Item = &.{};
    var done: [types.len]bool = @splat(false);
    var progress = true;
    while (progress) {
        progress = false;
        for (types, 0..) |it, i| {
            if (done[i]) continue;
            const ready = switch (it.kind) {
                .@"struct", .@"union" => r: {
                    for (valueDeps(typeByName(it.name))) |dep| {
                        for (types, 0..) |other, j| {
                            if (std.mem.eql(u8, other.name, dep) and !done[j]) break :r false;
                        }
                    }
                    break :r true;
                },
                else => true,
            };
            if (ready) {
                done[i] = true;
                ordered = ordered ++ [_]Item{it};
                progress = true;
            }
        }
    }
    if (ordered.len != types.len) @compileError("gen_header: kvmlab_* structs contain each other by value (cycle)");
    break :blk ordered ++ funcs;
    };
}

// ---------------------------------------------------------------------------
// Runtime: names and docs from capi.zig's source
// ---------------------------------------------------------------------------

const Source = struct {
    /// "decl" or "decl.field" -> doc comment text (lines joined by '\n').
    docs: std.StringHashMap([]const u8),
    /// exported function -> parameter names.
    params: std.StringHashMap([]const []const u8),

    fn scan(arena: std.mem.Allocator, comptime g: Group) !Source {
        var s: Source = .{ .docs = .init(arena), .params = .init(arena) };
        inline for (comptime g.modules()) |m| try s.scanInto(arena, m.source);
        return s;
    }

    fn scanInto(s: *Source, arena: std.mem.Allocator, src: [:0]const u8) !void {
        var toks: std.ArrayList(std.zig.Token) = .empty;
        var tz = std.zig.Tokenizer.init(src);
        while (true) {
            const t = tz.next();
            if (t.tag == .eof) break;
            if (t.tag == .invalid) return fatal("a capi file does not tokenize at byte {d}", .{t.loc.start});
            try toks.append(arena, t);
        }
        const ts = toks.items;
        const text = struct {
            fn of(source: [:0]const u8, t: std.zig.Token) []const u8 {
                return source[t.loc.start..t.loc.end];
            }
        }.of;
        const is = struct {
            fn tag(list: []const std.zig.Token, i: usize, t: std.zig.Token.Tag) bool {
                return i < list.len and list[i].tag == t;
            }
        }.tag;

        var depth: usize = 0; // brace depth
        var pending_decl: ?[]const u8 = null; // `pub const NAME =` awaiting its `{` or `;`
        var container: ?[]const u8 = null; // top-level container whose body we are in
        var i: usize = 0;
        while (i < ts.len) : (i += 1) {
            const t = ts[i];
            switch (t.tag) {
                .doc_comment => {
                    var j = i;
                    var doc: std.ArrayList(u8) = .empty;
                    while (j < ts.len and ts[j].tag == .doc_comment) : (j += 1) {
                        var l = text(src, ts[j])[3..];
                        if (l.len > 0 and l[0] == ' ') l = l[1..];
                        if (doc.items.len > 0) try doc.append(arena, '\n');
                        try doc.appendSlice(arena, std.mem.trimEnd(u8, l, " \t\r"));
                    }
                    // What does it document?
                    var k = j;
                    if (depth == 0) {
                        if (is(ts, k, .keyword_pub)) k += 1;
                        if (is(ts, k, .keyword_export)) k += 1;
                        if ((is(ts, k, .keyword_fn) or is(ts, k, .keyword_const) or is(ts, k, .keyword_var)) and
                            is(ts, k + 1, .identifier))
                        {
                            try s.docs.put(text(src, ts[k + 1]), doc.items);
                        }
                    } else if (depth == 1 and container != null and is(ts, k, .identifier)) {
                        const key = try std.fmt.allocPrint(arena, "{s}.{s}", .{ container.?, text(src, ts[k]) });
                        try s.docs.put(key, doc.items);
                    }
                    i = j - 1;
                },
                .keyword_export => {
                    if (depth != 0) continue;
                    if (!is(ts, i + 1, .keyword_fn) or !is(ts, i + 2, .identifier))
                        return fatal("{d}: only `pub export fn kvmlab_*` may be exported", .{line(src, t)});
                    const name = text(src, ts[i + 2]);
                    if (i == 0 or ts[i - 1].tag != .keyword_pub or !std.mem.startsWith(u8, name, prefix))
                        return fatal("{d}: exported function `{s}` must be `pub export fn kvmlab_*` to appear in kvmlab.h", .{ line(src, t), name });
                    if (!is(ts, i + 3, .l_paren)) return fatal("{d}: expected `(` after {s}", .{ line(src, t), name });
                    var names: std.ArrayList([]const u8) = .empty;
                    var pd: usize = 0;
                    var k = i + 3;
                    var at_param_start = false;
                    while (k < ts.len) : (k += 1) {
                        switch (ts[k].tag) {
                            .l_paren => {
                                pd += 1;
                                if (pd == 1) at_param_start = true;
                                continue;
                            },
                            .r_paren => {
                                pd -= 1;
                                if (pd == 0) break;
                            },
                            .comma => if (pd == 1) {
                                at_param_start = true;
                                continue;
                            },
                            .keyword_noalias, .keyword_comptime => if (pd == 1 and at_param_start) continue,
                            .identifier => if (pd == 1 and at_param_start and is(ts, k + 1, .colon)) {
                                try names.append(arena, text(src, ts[k]));
                            },
                            else => {},
                        }
                        at_param_start = false;
                    }
                    try s.params.put(name, names.items);
                    i += 2;
                },
                .keyword_pub => if (depth == 0 and is(ts, i + 1, .keyword_const) and
                    is(ts, i + 2, .identifier) and is(ts, i + 3, .equal))
                {
                    pending_decl = text(src, ts[i + 2]);
                },
                .keyword_fn => if (depth == 0) {
                    pending_decl = null;
                },
                .semicolon => if (depth == 0) {
                    pending_decl = null;
                },
                .l_brace => {
                    if (depth == 0) {
                        container = pending_decl;
                        pending_decl = null;
                    }
                    depth += 1;
                },
                .r_brace => {
                    if (depth == 0) return fatal("{d}: unbalanced `}}`", .{line(src, t)});
                    depth -= 1;
                    if (depth == 0) container = null;
                },
                else => {},
            }
        }
        return;
    }

    fn line(src: []const u8, t: std.zig.Token) usize {
        return std.mem.count(u8, src[0..t.loc.start], "\n") + 1;
    }
};

fn fatal(comptime fmt: []const u8, args: anytype) error{GenHeader} {
    std.debug.print("gen_header: " ++ fmt ++ "\n", args);
    return error.GenHeader;
}

// ---------------------------------------------------------------------------
// Rendering
// ---------------------------------------------------------------------------

const Out = struct {
    buf: std.ArrayList(u8) = .empty,
    gpa: std.mem.Allocator,

    fn print(o: *Out, comptime fmt: []const u8, args: anytype) !void {
        try o.buf.print(o.gpa, fmt, args);
    }
    fn write(o: *Out, s: []const u8) !void {
        try o.buf.appendSlice(o.gpa, s);
    }
    /// A doc comment as a C comment; `*/` inside it is defused.
    fn comment(o: *Out, indent: []const u8, doc: ?[]const u8) !void {
        const d = doc orelse return;
        var it = std.mem.splitScalar(u8, d, '\n');
        var n: usize = 0;
        while (it.next()) |_| n += 1;
        it.reset();
        if (n == 1) {
            try o.print("{s}/* ", .{indent});
            try o.safe(d);
            try o.write(" */\n");
            return;
        }
        try o.print("{s}/*\n", .{indent});
        while (it.next()) |l| {
            try o.print("{s} *", .{indent});
            if (l.len > 0) {
                try o.write(" ");
                try o.safe(l);
            }
            try o.write("\n");
        }
        try o.print("{s} */\n", .{indent});
    }
    fn safe(o: *Out, s: []const u8) !void {
        for (s, 0..) |c, k| {
            try o.buf.append(o.gpa, c);
            // break up `*/` and `/*`
            if ((c == '*' or c == '/') and k + 1 < s.len and s[k + 1] == (if (c == '*') @as(u8, '/') else '*'))
                try o.buf.append(o.gpa, ' ');
        }
    }
};

fn renderHeader(o: *Out, s: *const Source, comptime g: Group) !void {
    const items = comptime itemsOf(g);
    try o.print("/* {s}: generated by zigsrc/gen_header.zig from zigsrc/capi/ (group {s}); do not edit */\n", .{ g.headerName(), @tagName(g) });
    if (g == .testing) try o.write("/* The testing export group (benchmark floors, fault injection); read after kvmlab.h. */\n");
    try o.write("/* C ABI of libkvmlab. No preprocessor lines on purpose (cffi cdef);\n" ++
        "   C users include <stdint.h> and <stddef.h> first. */\n");

    try o.write("\n/* ---- handles and forward declarations ---- */\n\n");
    inline for (items) |it| switch (it.kind) {
        .@"opaque" => {
            try o.comment("", s.docs.get(it.name));
            try o.print("typedef struct {s} {s};\n", .{ it.name, it.name });
        },
        .@"struct", .@"union" => try o.print("typedef {s} {s} {s};\n", .{ @tagName(it.kind), it.name, it.name }),
        else => {},
    };

    try o.write("\n/* ---- enums ---- */\n");
    inline for (items) |it| if (it.kind == .@"enum") {
        try o.write("\n");
        try o.comment("", s.docs.get(it.name));
        try o.write("typedef enum {\n");
        inline for (it.tags) |tag| {
            const key = it.name ++ "." ++ tag.zig_name;
            try o.comment("    ", s.docs.get(key));
            try o.print("    {s} = {d},\n", .{ tag.c_name, tag.value });
        }
        try o.print("}} {s};\n", .{it.name});
    };

    try o.write("\n/* ---- structs ---- */\n");
    inline for (items) |it| if (it.kind == .@"struct" or it.kind == .@"union") {
        try o.write("\n");
        try o.comment("", s.docs.get(it.name));
        try o.print("{s} {s} {{\n", .{ @tagName(it.kind), it.name });
        inline for (it.fields) |f| {
            try o.comment("    ", s.docs.get(it.name ++ "." ++ f.name));
            try o.print("    {s};\n", .{f.decl});
        }
        try o.write("};\n");
    };

    try o.write("\n/* ---- functions ---- */\n");
    inline for (items) |it| if (it.kind == .func) {
        const names = s.params.get(it.name) orelse
            return fatal("pub fn {s} is not `pub export fn` in capi.zig (or not found in its source)", .{it.name});
        if (names.len != it.params.len)
            return fatal("{s}: found {d} parameter names in the source but {d} parameters by reflection", .{ it.name, names.len, it.params.len });
        try o.write("\n");
        try o.comment("", s.docs.get(it.name));
        try o.print("{s}{s}{s}(", .{ it.ret, if (it.ret[it.ret.len - 1] == '*') "" else " ", it.name });
        if (it.params.len == 0) try o.write("void");
        inline for (it.params, 0..) |p, k| {
            if (k > 0) try o.write(", ");
            try o.print("{s}{s}{s}", .{ p, if (p[p.len - 1] == '*') "" else " ", names[k] });
        }
        try o.write(");\n");
    };
    // Every exported function in the source must have been rendered.
    var it = s.params.keyIterator();
    while (it.next()) |k| {
        var found = false;
        inline for (items) |item| {
            if (item.kind == .func and std.mem.eql(u8, item.name, k.*)) found = true;
        }
        if (!found) return fatal("exported function {s} is not a pub kvmlab_* decl seen by reflection", .{k.*});
    }
}

fn renderCheck(o: *Out, comptime g: Group) !void {
    const items = comptime itemsOf(g);
    try o.write("/* generated by zigsrc/gen_header.zig --check-c: kvmlab.h must match Zig's layout */\n");
    try o.write("#include <stddef.h>\n#include <stdint.h>\n#include \"kvmlab.h\"\n");
    if (g == .testing) try o.write("#include \"kvmlab_testing.h\"\n");
    try o.write("\n");
    inline for (items) |it| switch (it.kind) {
        .@"struct", .@"union" => {
            try o.print("_Static_assert(sizeof({s}) == {d}, \"sizeof {s}\");\n", .{ it.name, it.size, it.name });
            inline for (it.fields) |f| {
                try o.print("_Static_assert(offsetof({s}, {s}) == {d}, \"offsetof {s}.{s}\");\n", .{ it.name, f.name, f.offset, it.name, f.name });
            }
        },
        .@"enum" => {
            try o.print("_Static_assert(sizeof({s}) == sizeof(int), \"sizeof {s}\");\n", .{ it.name, it.name });
            inline for (it.tags) |tag| {
                try o.print("_Static_assert({s} == {d}, \"{s}\");\n", .{ tag.c_name, tag.value, tag.c_name });
            }
        },
        .func => {
            // The prototype must be declared under this name.
            try o.print("void (*const kvmlab_check_{s})(void) = (void (*)(void)){s};\n", .{ it.name, it.name });
        },
        .@"opaque" => {},
    };
}

fn render(arena: std.mem.Allocator, o: *Out, check_c: bool, comptime g: Group) !void {
    if (check_c) return renderCheck(o, g);
    const s = try Source.scan(arena, g);
    try renderHeader(o, &s, g);
}

pub fn main(init: std.process.Init) !void {
    const arena = init.arena.allocator();
    const args = try init.minimal.args.toSlice(arena);
    var check_c = false;
    var group: Group = .product;
    for (args[1..]) |a| {
        if (std.mem.eql(u8, a, "--check-c")) {
            check_c = true;
        } else if (std.mem.startsWith(u8, a, "--group=") and std.meta.stringToEnum(Group, a["--group=".len..]) != null) {
            group = std.meta.stringToEnum(Group, a["--group=".len..]).?;
        } else {
            std.debug.print("usage: gen_header [--group=product|testing] [--check-c]\n", .{});
            std.process.exit(2);
        }
    }
    var o: Out = .{ .gpa = arena };
    const rendered = switch (group) {
        inline else => |g| render(arena, &o, check_c, g),
    };
    rendered catch |e| switch (e) {
        error.GenHeader => std.process.exit(1), // already explained on stderr
        else => return e,
    };
    try std.Io.File.stdout().writeStreamingAll(init.io, o.buf.items);
}

test "gen_header: both headers render and mention every item" {
    var arena_state = std.heap.ArenaAllocator.init(std.testing.allocator);
    defer arena_state.deinit();
    const arena = arena_state.allocator();
    inline for (.{ Group.product, Group.testing }) |g| {
        const s = try Source.scan(arena, g);
        var o: Out = .{ .gpa = arena };
        try renderHeader(&o, &s, g);
        const h = o.buf.items;
        try std.testing.expect(std.mem.startsWith(u8, h, "/* " ++ comptime g.headerName() ++ ": generated by zigsrc/gen_header.zig"));
        try std.testing.expect(std.mem.indexOfScalar(u8, h, '#') == null);
        inline for (comptime itemsOf(g)) |it| try std.testing.expect(std.mem.indexOf(u8, h, it.name) != null);
    }
}

test "gen_header: the product header exports no testing function" {
    inline for (comptime itemsOf(.product)) |it| {
        try std.testing.expect(!std.mem.startsWith(u8, it.name, "kvmlab_bench_"));
        try std.testing.expect(!std.mem.startsWith(u8, it.name, "kvmlab_fault_"));
        try std.testing.expect(!std.mem.startsWith(u8, it.name, "kvmlab_testing_"));
    }
    inline for (comptime itemsOf(.testing)) |it| {
        if (it.kind == .func) try std.testing.expect(std.mem.startsWith(u8, it.name, "kvmlab_bench_") or std.mem.startsWith(u8, it.name, "kvmlab_fault_") or std.mem.startsWith(u8, it.name, "kvmlab_testing_"));
    }
}

test "gen_header: type mapping" {
    const common = @import("capi/common.zig");
    try std.testing.expectEqualStrings("const uint8_t *", comptime cType(?[*]const u8, "t"));
    try std.testing.expectEqualStrings("const char *", comptime cType([*:0]const u8, "t"));
    try std.testing.expectEqualStrings("uint64_t *", comptime cType(?*u64, "t"));
    try std.testing.expectEqualStrings("kvmlab_vm **", comptime cType(?*?*common.kvmlab_vm, "t"));
    try std.testing.expectEqualStrings("const kvmlab_vm *", comptime cType(?*const common.kvmlab_vm, "t"));
    try std.testing.expectEqualStrings("void *", comptime cType(?*anyopaque, "t"));
    try std.testing.expectEqualStrings("size_t", comptime cType(usize, "t"));
    try std.testing.expectEqualStrings("int", comptime cType(c_int, "t"));
    try std.testing.expectEqualStrings("int32_t", comptime cType(i32, "t"));
    try std.testing.expectEqualStrings("uint64_t x[4][2]", comptime cDecl([4][2]u64, "x", "t"));
    try std.testing.expectEqualStrings("kvmlab_vm *x[3]", comptime cDecl([3]?*common.kvmlab_vm, "x", "t"));
}
