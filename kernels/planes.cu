// Byte planes of a whole snapshot, both ways, over a table of segments (docs/FORMAT.md 9.2-9.7).
//
// One row of `table` (STRIDE int64 fields, built by gpupas/backend/kernels_ref.py:segment_table)
// describes one segment of one tensor: where its values are, what they are coded against, and
// where each of its byte planes goes. planes_plain codes the segments without a context split, a
// tile of TILE values per block; planes_ctx codes the context-split segments, one block per
// segment, with a stable counting sort by the context byte. `decode` selects the inverse. The
// NumPy mirror of every function here is gpupas/backend/kernels_ref.py (tested bit-exactly
// against gpupas/pas on the CPU).

#define STRIDE 17
#define F_VAL 0    // address of the segment's first value (encode: read; decode: written)
#define F_BASE 1   // address of the base's values of the segment, or 0
#define F_BASE2 2  // 'pred': address of the grand-base's values of the segment, else 0
#define F_ALPHA 3  // 'pred': address of the tensor's int16 factors (one per coded row), else 0
#define F_N 4      // values in the segment
#define F_FIRST 5  // index of the segment's first value among the tensor's coded values
#define F_PER 6    // values per row
#define F_MODE 7   // width | enc << 8 | rotate << 12 | ctx << 13
#define F_TILE0 8  // planes_plain: the first tile of this segment
#define F_PLANE 9  // 8 fields: address of plane k of the segment (k < width)
#define TILE 4096  // values per block in planes_plain

#define ENC_MAT 0
#define ENC_SUB 1
#define ENC_XOR 2
#define ENC_PRED 3
#define PRED_FRAC 13

typedef unsigned long long u64;
typedef long long i64;

__device__ __forceinline__ u64 load_value(i64 addr, i64 i, int w) {
    switch (w) {
    case 1: return ((const unsigned char*)addr)[i];
    case 2: return ((const unsigned short*)addr)[i];
    case 4: return ((const unsigned int*)addr)[i];
    default: return ((const u64*)addr)[i];
    }
}

__device__ __forceinline__ void store_value(i64 addr, i64 i, int w, u64 v) {
    switch (w) {
    case 1: ((unsigned char*)addr)[i] = (unsigned char)v; break;
    case 2: ((unsigned short*)addr)[i] = (unsigned short)v; break;
    case 4: ((unsigned int*)addr)[i] = (unsigned int)v; break;
    default: ((u64*)addr)[i] = v;
    }
}

struct Seg {
    const i64* e;
    int w, bits, enc;
    bool rotate, ctx;
    u64 mask;
};

__device__ __forceinline__ Seg seg_of(const i64* e) {
    Seg s;
    s.e = e;
    i64 mode = e[F_MODE];
    s.w = (int)(mode & 0xFF);
    s.enc = (int)((mode >> 8) & 0xF);
    s.rotate = ((mode >> 12) & 1) != 0;
    s.ctx = ((mode >> 13) & 1) != 0;
    s.bits = 8 * s.w;
    s.mask = s.w == 8 ? ~0ull : ((1ull << s.bits) - 1);
    return s;
}

__device__ __forceinline__ u64 rot(const Seg& s, u64 u) {  // 9.2: the sign bit to the bottom
    return s.rotate ? (((u << 1) | (u >> (s.bits - 1))) & s.mask) : u;
}

__device__ __forceinline__ u64 unrot(const Seg& s, u64 c) {
    return s.rotate ? ((c >> 1) | ((c << (s.bits - 1)) & s.mask)) : c;
}

__device__ __forceinline__ unsigned top_byte(const Seg& s, u64 x) {  // the context byte of a raw pattern
    return (unsigned)((s.rotate ? (x >> (s.bits - 9)) : (x >> (s.bits - 8))) & 0xFF);
}

// What value i is coded against: the base's pattern, or for 'pred' the extrapolation (9.6).
__device__ __forceinline__ u64 base_of(const Seg& s, i64 i) {
    u64 b = load_value(s.e[F_BASE], i, s.w);
    if (s.enc == ENC_PRED) {
        u64 d = (b - load_value(s.e[F_BASE2], i, s.w)) & s.mask;
        i64 step = (i64)(d << (64 - s.bits)) >> (64 - s.bits);  // two's complement at the pattern width
        i64 alpha = ((const short*)s.e[F_ALPHA])[(s.e[F_FIRST] + i) / s.e[F_PER]];
        i64 adj = (alpha * step + (1ll << (PRED_FRAC - 1))) >> PRED_FRAC;  // arithmetic shift: floor
        b = (b + (u64)adj) & s.mask;
    }
    return b;
}

__device__ __forceinline__ u64 encode_value(const Seg& s, u64 u, u64 b) {  // 9.4, 9.5
    if (s.enc == ENC_MAT) return rot(s, u);
    if (s.enc == ENC_XOR) return rot(s, u ^ b);
    u64 d = (u - b) & s.mask;  // SUB (and 'pred', against the prediction), then zigzag
    u64 sign = ((d >> (s.bits - 1)) & 1) ? s.mask : 0;
    return ((d << 1) & s.mask) ^ sign;
}

__device__ __forceinline__ u64 decode_value(const Seg& s, u64 c, u64 b) {
    if (s.enc == ENC_MAT) return unrot(s, c);
    if (s.enc == ENC_XOR) return unrot(s, c) ^ b;
    u64 d = (c >> 1) ^ ((0ull - (c & 1)) & s.mask);
    return (d + b) & s.mask;
}

// The context byte of value i (9.7): its own top byte for 'mat' (decode: read from plane 0, kept in
// natural order), else the top byte of what it is coded against.
__device__ __forceinline__ unsigned context_of(const Seg& s, i64 i, int decode) {
    if (s.enc == ENC_MAT) {
        if (decode) return ((const unsigned char*)s.e[F_PLANE])[i];
        return top_byte(s, load_value(s.e[F_VAL], i, s.w));
    }
    return top_byte(s, base_of(s, i));
}

// Value i of the segment, whose planes are at position pos (pos == i without a context split).
__device__ __forceinline__ void code_one(const Seg& s, i64 i, i64 pos, int decode) {
    u64 b = s.enc == ENC_MAT ? 0 : base_of(s, i);
    if (!decode) {
        u64 c = encode_value(s, load_value(s.e[F_VAL], i, s.w), b);
        for (int k = 0; k < s.w; ++k) {
            i64 at = (k == 0 && s.enc == ENC_MAT && s.ctx) ? i : pos;  // 'mat' keeps plane 0 in natural order
            ((unsigned char*)s.e[F_PLANE + k])[at] = (unsigned char)(c >> (8 * (s.w - 1 - k)));
        }
    } else {
        u64 c = 0;
        for (int k = 0; k < s.w; ++k) {
            i64 at = (k == 0 && s.enc == ENC_MAT && s.ctx) ? i : pos;
            c = (c << 8) | ((const unsigned char*)s.e[F_PLANE + k])[at];
        }
        store_value(s.e[F_VAL], i, s.w, decode_value(s, c, b));
    }
}

extern "C" __global__ void planes_plain(const i64* table, int nseg, i64 ntiles, int decode) {
    for (i64 t = blockIdx.x; t < ntiles; t += gridDim.x) {
        int lo = 0, hi = nseg - 1;  // the last segment whose first tile is <= t
        while (lo < hi) {
            int mid = (lo + hi + 1) >> 1;
            if (table[(i64)mid * STRIDE + F_TILE0] <= t) lo = mid; else hi = mid - 1;
        }
        Seg s = seg_of(table + (i64)lo * STRIDE);
        i64 start = (t - s.e[F_TILE0]) * TILE;
        i64 end = min(start + (i64)TILE, s.e[F_N]);
        for (i64 i = start + threadIdx.x; i < end; i += blockDim.x) code_one(s, i, i, decode);
    }
}

// One block (a multiple of 32 threads, at most 1024) per context-split segment. The stable
// position of value i is start[c] + (values before i with the same context c): a histogram, an
// exclusive scan, then rounds of blockDim values ranked within each warp (__match_any_sync) and
// across warps (per-warp counts), in index order, so equal contexts keep their order.
extern "C" __global__ void planes_ctx(const i64* table, int nseg, int decode) {
    __shared__ unsigned int run[256];
    __shared__ unsigned int warp_count[32][256];
    int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nwarps = blockDim.x >> 5;
    for (int g = blockIdx.x; g < nseg; g += gridDim.x) {
        Seg s = seg_of(table + (i64)g * STRIDE);
        i64 n = s.e[F_N];
        for (int b = tid; b < 256; b += blockDim.x) run[b] = 0;
        __syncthreads();
        for (i64 i = tid; i < n; i += blockDim.x) atomicAdd(&run[context_of(s, i, decode)], 1u);
        __syncthreads();
        if (tid == 0) {
            unsigned int acc = 0;
            for (int b = 0; b < 256; ++b) {
                unsigned int c = run[b];
                run[b] = acc;
                acc += c;
            }
        }
        __syncthreads();
        for (i64 round = 0; round < n; round += blockDim.x) {
            i64 i = round + tid;
            bool valid = i < n;
            unsigned int c = valid ? context_of(s, i, decode) : 256u;
            for (int b = lane; b < 256; b += 32) warp_count[warp][b] = 0;
            __syncwarp();
            unsigned int peers = __match_any_sync(0xffffffffu, c);
            unsigned int rank = __popc(peers & ((1u << lane) - 1u));
            if (valid && rank == 0) warp_count[warp][c] = __popc(peers);
            __syncthreads();
            for (int b = tid; b < 256; b += blockDim.x) {  // per bin: where each warp's values start
                unsigned int acc = run[b];
                for (int w = 0; w < nwarps; ++w) {
                    unsigned int x = warp_count[w][b];
                    warp_count[w][b] = acc;
                    acc += x;
                }
                run[b] = acc;
            }
            __syncthreads();
            if (valid) code_one(s, i, (i64)warp_count[warp][c] + rank, decode);
            __syncthreads();
        }
    }
}
