// CRC-32 (gzip, tensors) and CRC-32C (Zarr's crc32c codec) of many messages at once: a reflected
// table-driven CRC parameterized by `consts` = [256-entry byte table, x^(2^k) mod P for k < X2N_LEN,
// P], built by gpupas/backend/kernels_ref.py:crc_consts, whose NumPy mirror this is.
//
// Each message is cut into PIECE-byte pieces, counted from its end: it is read as if left-padded
// with zeros to a whole number of pieces, which leaves a CRC with zero initial state unchanged.
// crc_pieces: one warp per piece, 32 bytes per lane, lanes joined by GF(2) multiplication by
// x^(8 * bytes to the right) (zlib's crc32_combine). crc_combine: one block per message folds its
// pieces in order, then applies the initial value and final xor (both 0xFFFFFFFF) and writes the
// CRC (and, where asked, its 4 little-endian bytes at an address: a stored chunk's suffix, a gzip
// trailer).

#define MSG_STRIDE 4
#define M_PTR 0     // address of the message
#define M_LEN 1     // its length in bytes
#define M_PIECE0 2  // index of its first piece among all pieces
#define M_DST 3     // where to write the CRC as 4 little-endian bytes, or 0
#define PIECE 1024  // bytes per piece: 32 lanes x LANE_BYTES
#define LANE_BYTES 32
#define LOG2_LANE_BITS 8   // 8 * LANE_BYTES = 2^8: x^(8 * 32 * 2^k) is x2n[8 + k]
#define LOG2_PIECE_BITS 13 // 8 * PIECE = 2^13
#define X2N_LEN 64  // entries of x^(2^k): k runs to 3 + 60 (not wrapped at 32 as zlib does: wrong for CRC-32C)

typedef long long i64;

__device__ __forceinline__ unsigned multmodp(unsigned a, unsigned b, unsigned poly) {  // a * b mod P; a != 0
    unsigned m = 1u << 31, p = 0;
    for (;;) {
        if (a & m) {
            p ^= b;
            if ((a & (m - 1)) == 0) break;
        }
        m >>= 1;
        b = (b & 1) ? (b >> 1) ^ poly : b >> 1;
    }
    return p;
}

__device__ __forceinline__ unsigned x2nmodp(i64 n, int k, const unsigned* x2n, unsigned poly) {  // x^(n * 2^k) mod P
    unsigned p = 1u << 31;  // x^0
    while (n) {
        if (n & 1) p = multmodp(x2n[k], p, poly);
        n >>= 1;
        k++;
    }
    return p;
}

__device__ __forceinline__ int message_of(const i64* msgs, int nmsg, i64 piece) {  // last m with PIECE0[m] <= piece
    int lo = 0, hi = nmsg - 1;
    while (lo < hi) {
        int mid = (lo + hi + 1) >> 1;
        if (msgs[(i64)mid * MSG_STRIDE + M_PIECE0] <= piece) lo = mid; else hi = mid - 1;
    }
    return lo;
}

extern "C" __global__ void crc_pieces(const i64* msgs, int nmsg, i64 npieces, const unsigned* consts,
                                      unsigned* raw) {
    __shared__ unsigned table[256];
    for (int b = threadIdx.x; b < 256; b += blockDim.x) table[b] = consts[b];
    __syncthreads();
    const unsigned* x2n = consts + 256;
    unsigned poly = consts[256 + X2N_LEN];
    int lane = threadIdx.x & 31;
    i64 warps = (i64)gridDim.x * (blockDim.x >> 5);
    for (i64 p = (i64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5); p < npieces; p += warps) {
        const i64* e = msgs + (i64)message_of(msgs, nmsg, p) * MSG_STRIDE;
        i64 len = e[M_LEN];
        i64 pad = (len + PIECE - 1) / PIECE * PIECE - len;
        i64 at = (p - e[M_PIECE0]) * PIECE + lane * LANE_BYTES - pad;  // first byte of this lane (< 0: padding)
        const unsigned char* src = (const unsigned char*)e[M_PTR];
        unsigned crc = 0;
        for (int j = 0; j < LANE_BYTES; ++j) {
            unsigned byte = at + j >= 0 ? src[at + j] : 0u;
            crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8);
        }
        for (int k = 0; k < 5; ++k) {  // lanes in order: left * x^(8 * len(right)) ^ right
            unsigned right = __shfl_down_sync(0xffffffffu, crc, 1 << k);
            if ((lane & ((2 << k) - 1)) == 0) crc = multmodp(x2n[LOG2_LANE_BITS + k], crc, poly) ^ right;
        }
        if (lane == 0) raw[p] = crc;
    }
}

extern "C" __global__ void crc_combine(const i64* msgs, int nmsg, const unsigned* consts, const unsigned* raw,
                                       unsigned* out) {
    __shared__ unsigned acc_s[1024];
    __shared__ i64 count_s[1024];
    const unsigned* x2n = consts + 256;
    unsigned poly = consts[256 + X2N_LEN];
    int tid = threadIdx.x;
    for (int m = blockIdx.x; m < nmsg; m += gridDim.x) {
        const i64* e = msgs + (i64)m * MSG_STRIDE;
        i64 len = e[M_LEN];
        i64 pieces = (len + PIECE - 1) / PIECE;
        i64 per = (pieces + blockDim.x - 1) / blockDim.x;
        i64 lo = min(pieces, tid * per), hi = min(pieces, lo + per);
        unsigned acc = 0;
        for (i64 q = lo; q < hi; ++q) acc = multmodp(x2n[LOG2_PIECE_BITS], acc, poly) ^ raw[e[M_PIECE0] + q];
        acc_s[tid] = acc;
        count_s[tid] = hi - lo;
        __syncthreads();
        for (int stride = 1; stride < blockDim.x; stride <<= 1) {
            if (tid % (2 * stride) == 0 && tid + stride < blockDim.x && count_s[tid + stride] > 0) {
                acc_s[tid] = multmodp(x2nmodp(count_s[tid + stride] * PIECE, 3, x2n, poly), acc_s[tid], poly)
                             ^ acc_s[tid + stride];
                count_s[tid] += count_s[tid + stride];
            }
            __syncthreads();
        }
        if (tid == 0) {
            unsigned crc = acc_s[0] ^ multmodp(x2nmodp(len, 3, x2n, poly), 0xFFFFFFFFu, poly) ^ 0xFFFFFFFFu;
            out[m] = crc;
            if (e[M_DST]) {
                unsigned char* dst = (unsigned char*)e[M_DST];
                for (int b = 0; b < 4; ++b) dst[b] = (unsigned char)(crc >> (8 * b));
            }
        }
        __syncthreads();
    }
}
