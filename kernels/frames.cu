// Stored chunks built and taken apart on the device (docs/FORMAT.md 3, 7), so that only finished
// payloads cross to the host and stored payloads go up in one copy.
//
// pack_payloads: one block per chosen chunk writes its body at its place in the packed output:
//   RAW      a Zstandard frame of raw blocks (+ RLE blocks of zero padding), built without a coder;
//   CODED    a coder's output as it is (an nvCOMP RAW Zstd frame, an nvCOMP ANS stream);
//   GZIP     a gzip member around nvCOMP's raw Deflate: 10-byte header, the Deflate data, the CRC-32
//            of the uncompressed chunk (computed on the device by crc.cu) and its size.
// The CRC-32C suffix of each body is then written by crc_combine. copy_spans: one block per span,
// a plain copy (raw frames' blocks into their chunks on restore). run_bytes: one block per chunk
// counts its bytes equal to the three before them (in runs of four or more: what Zstandard's matches
// code almost for free and Huffman coding cannot), for the codec choice. NumPy mirror:
// gpupas/backend/kernels_ref.py.

#define JOB_STRIDE 7
#define J_KIND 0
#define J_SRC 1      // address of the coder's output, or of the chunk's bytes (RAW)
#define J_SRCLEN 2   // bytes of coder output (CODED, GZIP)
#define J_DST 3      // address of the body in the packed output
#define J_SIZE 4     // the chunk size: what the body decodes to
#define J_N 5        // RAW: stream bytes in the chunk (the rest is zero padding)
#define J_CRC 6      // GZIP: index into crcs of the chunk's CRC-32

#define KIND_RAW 0
#define KIND_CODED 1
#define KIND_GZIP 2
#define ZSTD_BLOCK 131072  // largest Zstandard block
#define GZIP_HEADER 10

#define SPAN_STRIDE 3

typedef long long i64;

__device__ __forceinline__ void put_le(unsigned char* p, unsigned long long v, int nbytes) {
    for (int b = 0; b < nbytes; ++b) p[b] = (unsigned char)(v >> (8 * b));
}

extern "C" __global__ void pack_payloads(const i64* jobs, int njobs, const unsigned* crcs) {
    int tid = threadIdx.x;
    for (int j = blockIdx.x; j < njobs; j += gridDim.x) {
        const i64* e = jobs + (i64)j * JOB_STRIDE;
        const unsigned char* src = (const unsigned char*)e[J_SRC];
        unsigned char* dst = (unsigned char*)e[J_DST];
        i64 size = e[J_SIZE];
        if (e[J_KIND] == KIND_RAW) {
            i64 n = e[J_N];
            i64 nblocks = (n + ZSTD_BLOCK - 1) / ZSTD_BLOCK;
            for (i64 i = tid; i < n; i += blockDim.x) dst[9 + 3 * (i / ZSTD_BLOCK + 1) + i] = src[i];
            if (tid == 0) {
                dst[0] = 0x28; dst[1] = 0xB5; dst[2] = 0x2F; dst[3] = 0xFD;  // magic
                dst[4] = 0xA0;  // single segment, 4-byte content size, no checksum, no dictionary
                put_le(dst + 5, (unsigned long long)size, 4);
                for (i64 b = 0; b < nblocks; ++b) {  // raw blocks
                    i64 len = min((i64)ZSTD_BLOCK, n - b * ZSTD_BLOCK);
                    bool last = b == nblocks - 1 && size == n;
                    put_le(dst + 9 + b * (ZSTD_BLOCK + 3), (unsigned long long)(last | (len << 3)), 3);
                }
                unsigned char* p = dst + 9 + 3 * nblocks + n;
                for (i64 pad = size - n; pad > 0;) {  // RLE blocks of zeros up to the chunk size
                    i64 step = min(pad, (i64)ZSTD_BLOCK);
                    pad -= step;
                    put_le(p, (unsigned long long)((pad == 0) | (1 << 1) | (step << 3)), 3);
                    p[3] = 0;
                    p += 4;
                }
                if (size == 0) put_le(p, 1, 3);  // one empty last raw block
            }
        } else {
            i64 len = e[J_SRCLEN];
            i64 at = e[J_KIND] == KIND_GZIP ? GZIP_HEADER : 0;
            for (i64 i = tid; i < len; i += blockDim.x) dst[at + i] = src[i];
            if (tid == 0 && e[J_KIND] == KIND_GZIP) {
                // ID1 ID2, CM = 8 (Deflate), FLG = 0, MTIME = 0, XFL = 0, OS = 255 (unknown)
                dst[0] = 0x1F; dst[1] = 0x8B; dst[2] = 8;
                for (int b = 3; b < 9; ++b) dst[b] = 0;
                dst[9] = 0xFF;
                put_le(dst + GZIP_HEADER + len, crcs[e[J_CRC]], 4);
                put_le(dst + GZIP_HEADER + len + 4, (unsigned long long)size & 0xFFFFFFFFull, 4);
            }
        }
    }
}

extern "C" __global__ void copy_spans(const i64* spans, int nspans) {
    for (int j = blockIdx.x; j < nspans; j += gridDim.x) {
        const i64* e = spans + (i64)j * SPAN_STRIDE;
        const unsigned char* src = (const unsigned char*)e[0];
        unsigned char* dst = (unsigned char*)e[1];
        for (i64 i = threadIdx.x; i < e[2]; i += blockDim.x) dst[i] = src[i];
    }
}

#define RUN_THREADS 256  // run_bytes's block size (a power of two)

extern "C" __global__ void run_bytes(const unsigned char* src, i64 stride, i64 size, int nchunks, i64* out) {
    __shared__ i64 part[RUN_THREADS];
    int tid = threadIdx.x;
    for (int c = blockIdx.x; c < nchunks; c += gridDim.x) {
        const unsigned char* p = src + (i64)c * stride;
        i64 k = 0;
        for (i64 i = 3 + tid; i < size; i += blockDim.x) k += p[i] == p[i - 1] && p[i] == p[i - 2] && p[i] == p[i - 3];
        part[tid] = k;
        __syncthreads();
        for (int half = RUN_THREADS / 2; half > 0; half >>= 1) {
            if (tid < half) part[tid] += part[tid + half];
            __syncthreads();
        }
        if (tid == 0) out[c] = part[0];
        __syncthreads();
    }
}
