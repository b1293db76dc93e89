/* gpupas._fastc: the compiled kernels of the CPU fast path (see gpupas/backend/fast.py).
 *
 * Each kernel fuses what the NumPy reference (gpupas/pas) does in several passes: rotation, delta
 * (SUB + zigzag, XOR, or SUB against the 'pred' extrapolation), the context sort (a counting sort by
 * the context byte instead of a stable argsort) and the split into byte planes; decoding likewise.
 * Values are read through a row map where only the changed rows of a tensor are coded. Every function
 * checks its buffers' sizes against the indices it will use, then releases the GIL for the loop, so
 * the executor's threads run them in parallel. Plain C99 and the CPython buffer protocol: no NumPy
 * headers, nothing to link.
 *
 * tests/test_fast.py checks every kernel bit for bit against the reference.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(_MSC_VER)
#define INLINE __forceinline
#define RESTRICT __restrict
#define PREFETCH(p) ((void)(p))
#else
#define INLINE inline __attribute__((always_inline))
#define RESTRICT __restrict__
#define PREFETCH(p) __builtin_prefetch(p)
#endif
#define PREFETCH_AHEAD 16  /* samples read ahead of use by sample_entropies (a hint: any value is correct) */

#define CAT2(a, b) a##b
#define CAT(a, b) CAT2(a, b)

typedef struct {
    const void *u, *ub, *ub2;   /* the values, the base, the base's base (every row; read through rowmap) */
    const int16_t *alpha;       /* 'pred' factors, one per coded row */
    const int64_t *rowmap;      /* the tensor row of each coded row (nrowmap 0: every row, in order) */
    Py_ssize_t nrowmap, per, start, n;  /* values per row; the coded values start .. start+n-1 */
} Seg;

/* The index in the whole tensor of a segment's coded position ci (through the row map where rows are masked). */
static INLINE Py_ssize_t full_index(const Seg *g, Py_ssize_t ci) {
    if (!g->nrowmap) return ci;
    Py_ssize_t r = ci / g->per;
    return (Py_ssize_t)g->rowmap[r] * g->per + (ci - r * g->per);
}

/* The kernels shift negative int64 right expecting floor (arithmetic shift) and convert unsigned patterns
 * to the signed type of their width by wrapping: what GCC, Clang and MSVC do (C leaves both to the
 * implementation). Refuse to build where that does not hold. */
typedef char arithmetic_shift_check[((int64_t)-8193 >> 13) == -2 ? 1 : -1];
typedef char wrapping_conversion_check[(int16_t)(uint16_t)0xFFFF == -1 ? 1 : -1];

/* Reorder a[0:k] so that a[h] holds what a sort would put there, smaller values before it. */
static void select_nth(double *a, Py_ssize_t k, Py_ssize_t h) {
    Py_ssize_t lo = 0, hi = k - 1;
    while (lo < hi) {
        double pivot = a[lo + (hi - lo) / 2];
        Py_ssize_t i = lo, j = hi;
        while (i <= j) {
            while (a[i] < pivot) i++;
            while (a[j] > pivot) j--;
            if (i <= j) { double t = a[i]; a[i] = a[j]; a[j] = t; i++; j--; }
        }
        if (h <= j) hi = j;
        else if (h >= i) lo = i;
        else break;
    }
}

/* Per plane p, the reference's Miller-Madow entropy (gpupas.pas.context.plane_entropies) from its byte counts
 * cnt[(p * k + ctx) * 256 + byte] of m values: the same sums in the same order (NumPy's bincount with
 * weights adds in index order) of the same terms (nlogn[c] = c * log2(c), computed by NumPy), so the
 * same doubles. */
static void entropies(const int64_t *cnt, int w, int k, Py_ssize_t m, const double *nlogn, double ln2x2, double *h) {
    for (int p = 0; p < w; p++) {
        double sc = 0.0, sr = 0.0;
        int64_t nc = 0, nr = 0;
        for (int q = 0; q < k; q++) {
            const int64_t *row = cnt + ((Py_ssize_t)p * k + q) * 256;
            int64_t tot = 0;
            for (int b = 0; b < 256; b++) {
                if (row[b]) { sc += nlogn[row[b]]; nc++; tot += row[b]; }
            }
            if (tot) { sr += nlogn[tot]; nr++; }
        }
        h[p] = m ? (sr - sc + (double)(nc - nr) / ln2x2) / (double)m : 0.0;
    }
}

/* The loop over a segment's coded values: i (position in the segment), r (coded row), fi (the value's
 * index in the whole tensor). */
#define ROWS_BEGIN(g)                                                                                    \
    {                                                                                                    \
        const Py_ssize_t per_ = (g)->per, n_ = (g)->n;                                                   \
        const int64_t *rm_ = (g)->rowmap;                                                                \
        const int masked_ = (g)->nrowmap > 0;                                                            \
        Py_ssize_t r = n_ ? (g)->start / per_ : 0;                                                       \
        Py_ssize_t col_ = n_ ? (g)->start - r * per_ : 0;                                                \
        Py_ssize_t rowbase_ = n_ ? (masked_ ? (Py_ssize_t)rm_[r] * per_ : r * per_) : 0;                 \
        for (Py_ssize_t i = 0; i < n_; i++) {                                                            \
            const Py_ssize_t fi = rowbase_ + col_;
#define ROWS_END                                                                                         \
            if (++col_ == per_) {                                                                        \
                col_ = 0;                                                                                \
                r++;                                                                                     \
                if (i + 1 < n_) rowbase_ = masked_ ? (Py_ssize_t)rm_[r] * per_ : r * per_;               \
            }                                                                                            \
        }                                                                                                \
    }

#define W 1
#define T uint8_t
#define S int8_t
#define SUF _1
#include "_fastc_width.h"
#undef W
#undef T
#undef S
#undef SUF
#define W 2
#define T uint16_t
#define S int16_t
#define SUF _2
#include "_fastc_width.h"
#undef W
#undef T
#undef S
#undef SUF
#define W 4
#define T uint32_t
#define S int32_t
#define SUF _4
#include "_fastc_width.h"
#undef W
#undef T
#undef S
#undef SUF
#define W 8
#define T uint64_t
#define S int64_t
#define SUF _8
#include "_fastc_width.h"
#undef W
#undef T
#undef S
#undef SUF

#include "_fastc_deflate.h"

/* -- argument checks ------------------------------------------------------------------------------ */

#define NBUF 12
typedef struct { Py_buffer b[NBUF]; int used; } Bufs;

static void release(Bufs *bs) {
    for (int k = 0; k < bs->used; k++) PyBuffer_Release(&bs->b[k]);
    bs->used = 0;
}

static int fail(const char *msg) {
    PyErr_SetString(PyExc_ValueError, msg);
    return -1;
}

static int width_ok(int w) { return w == 1 || w == 2 || w == 4 || w == 8; }

/* a * b <= cap for non-negative a, b, without overflowing */
static int product_fits(Py_ssize_t a, Py_ssize_t b, Py_ssize_t cap) {
    return a >= 0 && b >= 0 && (b == 0 || a <= cap / b);
}

/* The segment's values and what they are read against, checked: every index the loops use lies in
 * its buffer (a damaged or hostile manifest must not make a kernel read or write outside). */
static int check_seg(Seg *g, int w, int kind, Py_buffer *u, Py_buffer *ub, Py_buffer *ub2, Py_buffer *alpha,
                     Py_buffer *rowmap) {
    if (!width_ok(w)) return fail("width must be 1, 2, 4 or 8");
    if (kind < 0 || kind > 3 || (kind == 3 && w > 4)) return fail("bad encoding");
    if (g->n < 0 || g->start < 0 || (g->n > 0 && g->per <= 0) || g->start > PY_SSIZE_T_MAX - g->n)
        return fail("bad segment");
    g->nrowmap = rowmap->len / 8;
    g->rowmap = (const int64_t *)rowmap->buf;
    if (g->n == 0) return 0;
    Py_ssize_t r0 = g->start / g->per, r1 = (g->start + g->n - 1) / g->per;  /* coded rows touched */
    Py_ssize_t need = g->start + g->n;  /* full-tensor values needed */
    if (g->nrowmap) {
        if (r1 >= g->nrowmap) return fail("row map too short");
        int64_t top = -1;
        for (Py_ssize_t r = r0; r <= r1; r++) {
            if (g->rowmap[r] < 0) return fail("bad row map");
            if (g->rowmap[r] > top) top = g->rowmap[r];
        }
        if (top >= PY_SSIZE_T_MAX / g->per) return fail("bad row map");
        need = ((Py_ssize_t)top + 1) * g->per;
    }
    if (u && u->len / w < need) return fail("values out of range");
    if (kind != 0 && ub->len / w < need) return fail("base out of range");
    if (kind == 3 && (ub2->len / w < need || alpha->len / 2 <= r1)) return fail("prediction out of range");
    return 0;
}

static int check_planes(uint8_t **p, int w, Py_buffer *flat, Py_buffer *offs, Py_ssize_t n) {
    if (offs->len != 8 * w) return fail("one offset a plane");
    const int64_t *o = (const int64_t *)offs->buf;
    for (int k = 0; k < 8; k++) p[k] = (uint8_t *)flat->buf;
    for (int k = 0; k < w; k++) {
        if (o[k] < 0 || n > flat->len || o[k] > flat->len - n) return fail("plane out of range");
        p[k] = (uint8_t *)flat->buf + o[k];
    }
    return 0;
}

/* -- the module's functions ----------------------------------------------------------------------- */

PyDoc_STRVAR(encode_doc,
"encode(w, kind, s, ctx, u, ub, ub2, alpha, rowmap, per, start, n, flat, offs, step, sample, cs, ks, srt)\n"
"Write the planes of coded values start..start+n-1 into flat at offs; with ctx, sorted by context\n"
"(sample: the histogram of every step-th context byte; cs, ks, srt: scratch).");

static PyObject *encode(PyObject *Py_UNUSED(self), PyObject *args) {
    int w, kind, s, ctx;
    Seg g = {0};
    Py_ssize_t step;
    Bufs bs = {0};
    if (!PyArg_ParseTuple(args, "iiiiy*y*y*y*y*nnnw*y*nw*w*w*w*", &w, &kind, &s, &ctx, &bs.b[0], &bs.b[1], &bs.b[2],
                          &bs.b[3], &bs.b[4], &g.per, &g.start, &g.n, &bs.b[5], &bs.b[6], &step, &bs.b[7], &bs.b[8],
                          &bs.b[9], &bs.b[10]))
        return NULL;
    bs.used = 11;
    uint8_t *p[8];
    if (check_seg(&g, w, kind, &bs.b[0], &bs.b[1], &bs.b[2], &bs.b[3], &bs.b[4]) ||
        check_planes(p, w, &bs.b[5], &bs.b[6], g.n))
        goto error;
    if (ctx && (step < 1 || bs.b[7].len < 256 * 8 || bs.b[8].len / w < g.n || bs.b[9].len < g.n ||
                bs.b[10].len / w < g.n)) {
        fail("scratch too small");
        goto error;
    }
    if (g.n == 0) goto done;  /* nothing to code: start is not checked, so the kernels must not offset by it */
    g.u = bs.b[0].buf; g.ub = bs.b[1].buf; g.ub2 = bs.b[2].buf; g.alpha = (const int16_t *)bs.b[3].buf;
    s = s && w > 1 ? 1 : 0;  /* one-byte values are never rotated */
    Py_BEGIN_ALLOW_THREADS
    int64_t *sample = (int64_t *)bs.b[7].buf;
    void *cs = bs.b[8].buf, *srt = bs.b[10].buf;
    uint8_t *ks = (uint8_t *)bs.b[9].buf;
    int any = g.nrowmap > 0 || kind == 3;
    switch (w) {
    case 1: if (ctx) enc_ctx_1(&g, p, kind, s, sample, step, cs, ks, srt); else if (any) enc_any_1(&g, p, kind, s); else enc_plain_1(&g, p, kind, s); break;
    case 2: if (ctx) enc_ctx_2(&g, p, kind, s, sample, step, cs, ks, srt); else if (any) enc_any_2(&g, p, kind, s); else enc_plain_2(&g, p, kind, s); break;
    case 4: if (ctx) enc_ctx_4(&g, p, kind, s, sample, step, cs, ks, srt); else if (any) enc_any_4(&g, p, kind, s); else enc_plain_4(&g, p, kind, s); break;
    default: if (ctx) enc_ctx_8(&g, p, kind, s, sample, step, cs, ks, srt); else if (any) enc_any_8(&g, p, kind, s); else enc_plain_8(&g, p, kind, s); break;
    }
    Py_END_ALLOW_THREADS
done:
    release(&bs);
    Py_RETURN_NONE;
error:
    release(&bs);
    return NULL;
}

PyDoc_STRVAR(decode_doc,
"decode(w, kind, s, ctx, flat, offs, ub, ub2, alpha, rowmap, per, start, n, out, bs, ks, joined)\n"
"Inverse of encode: the raw patterns of coded values start..start+n-1 into out (the whole tensor's\n"
"patterns, through rowmap where rows are masked); bs, ks, joined: scratch.");

static PyObject *decode(PyObject *Py_UNUSED(self), PyObject *args) {
    int w, kind, s, ctx;
    Seg g = {0};
    Bufs bs = {0};
    if (!PyArg_ParseTuple(args, "iiiiy*y*y*y*y*y*nnnw*w*w*w*", &w, &kind, &s, &ctx, &bs.b[0], &bs.b[1], &bs.b[2],
                          &bs.b[3], &bs.b[4], &bs.b[5], &g.per, &g.start, &g.n, &bs.b[6], &bs.b[7], &bs.b[8],
                          &bs.b[9]))
        return NULL;
    bs.used = 10;
    uint8_t *p[8];
    if (check_seg(&g, w, kind, &bs.b[6], &bs.b[2], &bs.b[3], &bs.b[4], &bs.b[5]) ||
        check_planes(p, w, &bs.b[0], &bs.b[1], g.n))
        goto error;
    if (ctx && (bs.b[7].len / w < (kind ? g.n : 0) || bs.b[8].len < g.n || bs.b[9].len / w < g.n)) {
        fail("scratch too small");
        goto error;
    }
    if (g.n == 0) goto done;  /* nothing to decode: start is not checked, so the kernels must not offset by it */
    g.u = bs.b[6].buf; g.ub = bs.b[2].buf; g.ub2 = bs.b[3].buf; g.alpha = (const int16_t *)bs.b[4].buf;
    s = s && w > 1 ? 1 : 0;  /* one-byte values are never rotated */
    Py_BEGIN_ALLOW_THREADS
    const uint8_t *const *cp = (const uint8_t *const *)p;
    void *out = bs.b[6].buf, *sb = bs.b[7].buf, *sj = bs.b[9].buf;
    uint8_t *ks = (uint8_t *)bs.b[8].buf;
    int any = g.nrowmap > 0 || kind == 3;
    switch (w) {
    case 1: if (ctx) dec_ctx_1(&g, cp, out, kind, s, sb, ks, sj); else if (any) dec_any_1(&g, cp, out, kind, s); else dec_plain_1(&g, cp, out, kind, s); break;
    case 2: if (ctx) dec_ctx_2(&g, cp, out, kind, s, sb, ks, sj); else if (any) dec_any_2(&g, cp, out, kind, s); else dec_plain_2(&g, cp, out, kind, s); break;
    case 4: if (ctx) dec_ctx_4(&g, cp, out, kind, s, sb, ks, sj); else if (any) dec_any_4(&g, cp, out, kind, s); else dec_plain_4(&g, cp, out, kind, s); break;
    default: if (ctx) dec_ctx_8(&g, cp, out, kind, s, sb, ks, sj); else if (any) dec_any_8(&g, cp, out, kind, s); else dec_plain_8(&g, cp, out, kind, s); break;
    }
    Py_END_ALLOW_THREADS
done:
    release(&bs);
    Py_RETURN_NONE;
error:
    release(&bs);
    return NULL;
}

PyDoc_STRVAR(copy_rows_doc,
"copy_rows(w, out, base, rowmap, rows, per)\n"
"The rows of base that rowmap (sorted) does not list into out: a masked tensor's unchanged rows.");

static PyObject *copy_rows(PyObject *Py_UNUSED(self), PyObject *args) {
    int w;
    Py_ssize_t rows, per;
    Bufs bs = {0};
    if (!PyArg_ParseTuple(args, "iw*y*y*nn", &w, &bs.b[0], &bs.b[1], &bs.b[2], &rows, &per)) return NULL;
    bs.used = 3;
    if (!width_ok(w) || !product_fits(rows, per, bs.b[0].len / w) || !product_fits(rows, per, bs.b[1].len / w)) {
        fail("bad rows");
        release(&bs);
        return NULL;
    }
    if (rows == 0 || per == 0) {  /* nothing to copy (and per * w might overflow, rows of nothing loop long) */
        release(&bs);
        Py_RETURN_NONE;
    }
    Py_BEGIN_ALLOW_THREADS
    const int64_t *rm = (const int64_t *)bs.b[2].buf;
    Py_ssize_t nrm = bs.b[2].len / 8, j = 0, sz = per * w;
    char *out = (char *)bs.b[0].buf;
    const char *base = (const char *)bs.b[1].buf;
    for (Py_ssize_t r = 0; r < rows; r++) {
        if (j < nrm && rm[j] == r) { j++; continue; }
        memcpy(out + r * sz, base + r * sz, (size_t)sz);
    }
    Py_END_ALLOW_THREADS
    release(&bs);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(sample_entropies_doc,
"sample_entropies(w, kind, s, u, ub, idx, rowmap, per, nlogn, ln2x2, hp, hj, cnt, coded, keys)\n"
"The reference's plane_entropies of the coded planes of the values at sorted coded positions idx: into hp,\n"
"and where hj is not empty into hj conditioned on the context byte. nlogn[c] = c * log2(c) for every count\n"
"up to len(idx); ln2x2 = 2 * log(2); cnt, coded, keys: scratch.");

static PyObject *sample_entropies(PyObject *Py_UNUSED(self), PyObject *args) {
    int w, kind, s;
    double ln2x2;
    Seg g = {0};
    Bufs bs = {0};
    if (!PyArg_ParseTuple(args, "iiiy*y*y*y*ny*dw*w*w*w*w*", &w, &kind, &s, &bs.b[0], &bs.b[1], &bs.b[2], &bs.b[3],
                          &g.per, &bs.b[4], &ln2x2, &bs.b[5], &bs.b[6], &bs.b[7], &bs.b[8], &bs.b[9]))
        return NULL;
    bs.used = 10;
    Py_ssize_t m = bs.b[2].len / 8;
    const int64_t *idx = (const int64_t *)bs.b[2].buf;
    if (m > 0) {  /* checked as the segment of every coded value up to the largest sampled one */
        for (Py_ssize_t t = 1; t < m; t++) if (idx[t] < idx[t - 1]) { fail("unsorted sample"); goto error; }
        if (idx[0] < 0 || idx[m - 1] >= PY_SSIZE_T_MAX) { fail("bad sample"); goto error; }
        g.n = (Py_ssize_t)idx[m - 1] + 1;
    }
    if (kind == 3) { fail("bad encoding"); goto error; }
    if (check_seg(&g, w, kind, &bs.b[0], &bs.b[1], NULL, NULL, &bs.b[3])) goto error;
    if (bs.b[4].len / 8 <= m || bs.b[5].len < 8 * w || (bs.b[6].len && bs.b[6].len < 8 * w) ||
        bs.b[7].len < 8 * 256 * 256 * w || bs.b[8].len < 8 * m || bs.b[9].len < m) {
        fail("buffers too small");
        goto error;
    }
    g.u = bs.b[0].buf; g.ub = kind ? bs.b[1].buf : bs.b[0].buf;
    s = s && w > 1 ? 1 : 0;  /* one-byte values are never rotated */
    Py_BEGIN_ALLOW_THREADS
    const double *nlogn = (const double *)bs.b[4].buf;
    double *hp = (double *)bs.b[5].buf, *hj = bs.b[6].len ? (double *)bs.b[6].buf : NULL;
    int64_t *cnt = (int64_t *)bs.b[7].buf;
    uint64_t *coded = (uint64_t *)bs.b[8].buf;
    uint8_t *keys = (uint8_t *)bs.b[9].buf;
    switch (w) {
    case 1: sample_entropies_1(&g, idx, m, kind, s, nlogn, ln2x2, hp, hj, cnt, coded, keys); break;
    case 2: sample_entropies_2(&g, idx, m, kind, s, nlogn, ln2x2, hp, hj, cnt, coded, keys); break;
    case 4: sample_entropies_4(&g, idx, m, kind, s, nlogn, ln2x2, hp, hj, cnt, coded, keys); break;
    default: sample_entropies_8(&g, idx, m, kind, s, nlogn, ln2x2, hp, hj, cnt, coded, keys); break;
    }
    Py_END_ALLOW_THREADS
    release(&bs);
    Py_RETURN_NONE;
error:
    release(&bs);
    return NULL;
}

PyDoc_STRVAR(gather_doc, "gather(w, x, idx, rowmap, per, out)\nx at the sorted coded positions idx (through rowmap).");

static PyObject *gather(PyObject *Py_UNUSED(self), PyObject *args) {
    int w;
    Seg g = {0};
    Bufs bs = {0};
    if (!PyArg_ParseTuple(args, "iy*y*y*nw*", &w, &bs.b[0], &bs.b[1], &bs.b[2], &g.per, &bs.b[3])) return NULL;
    bs.used = 4;
    Py_ssize_t m = bs.b[1].len / 8;
    const int64_t *idx = (const int64_t *)bs.b[1].buf;
    if (m > 0) {
        for (Py_ssize_t t = 1; t < m; t++) if (idx[t] < idx[t - 1]) { fail("unsorted sample"); goto error; }
        if (idx[0] < 0 || idx[m - 1] >= PY_SSIZE_T_MAX) { fail("bad sample"); goto error; }
        g.n = (Py_ssize_t)idx[m - 1] + 1;
    }
    if (check_seg(&g, w, 0, &bs.b[0], NULL, NULL, NULL, &bs.b[2]) || (bs.b[3].len / w < m && fail("out too small")))
        goto error;
    g.u = bs.b[0].buf;
    Py_BEGIN_ALLOW_THREADS
    switch (w) {
    case 1: gather_1(&g, idx, m, bs.b[3].buf); break;
    case 2: gather_2(&g, idx, m, bs.b[3].buf); break;
    case 4: gather_4(&g, idx, m, bs.b[3].buf); break;
    default: gather_8(&g, idx, m, bs.b[3].buf); break;
    }
    Py_END_ALLOW_THREADS
    release(&bs);
    Py_RETURN_NONE;
error:
    release(&bs);
    return NULL;
}

PyDoc_STRVAR(fit_rows_doc,
"fit_rows(w, u, ub, ub2, rowmap, rows, per, cols, q, gain, scale)\n"
"Per coded row: the reference fit's factor before its cost test, the test's gain and the sum of its\n"
"absolute terms (the caller re-checks rows near the threshold with NumPy's log2).");

static PyObject *fit_rows(PyObject *Py_UNUSED(self), PyObject *args) {
    int w;
    Py_ssize_t rows;
    Seg g = {0};
    Bufs bs = {0};
    if (!PyArg_ParseTuple(args, "iy*y*y*y*nny*w*w*w*", &w, &bs.b[0], &bs.b[1], &bs.b[2], &bs.b[3], &rows, &g.per,
                          &bs.b[4], &bs.b[5], &bs.b[6], &bs.b[7]))
        return NULL;
    bs.used = 8;
    Py_ssize_t nc = bs.b[4].len / 8;
    const int64_t *cols = (const int64_t *)bs.b[4].buf;
    g.start = 0;
    if (w > 4 || nc < 1 || !product_fits(rows, g.per, PY_SSIZE_T_MAX)) { fail("bad fit"); goto error; }
    g.n = rows * g.per;
    for (Py_ssize_t j = 0; j < nc; j++) if (cols[j] < 0 || cols[j] >= g.per) { fail("bad columns"); goto error; }
    if (check_seg(&g, w, 1, &bs.b[0], &bs.b[1], NULL, NULL, &bs.b[3]) ||
        (bs.b[2].len < bs.b[1].len && fail("grand-base out of range")) ||
        ((bs.b[5].len / 2 < rows || bs.b[6].len / 8 < rows || bs.b[7].len / 8 < rows) && fail("outputs too small")))
        goto error;
    g.u = bs.b[0].buf; g.ub = bs.b[1].buf; g.ub2 = bs.b[2].buf;
    int64_t *nw = PyMem_Malloc(sizeof(int64_t) * 2 * nc);
    double *ratio = PyMem_Malloc(sizeof(double) * nc);
    if (!nw || !ratio) { PyMem_Free(nw); PyMem_Free(ratio); PyErr_NoMemory(); goto error; }
    Py_BEGIN_ALLOW_THREADS
    int16_t *q = (int16_t *)bs.b[5].buf;
    double *gain = (double *)bs.b[6].buf, *scale = (double *)bs.b[7].buf;
    switch (w) {
    case 1: fit_rows_1(&g, rows, cols, nc, q, gain, scale, nw, nw + nc, ratio); break;
    case 2: fit_rows_2(&g, rows, cols, nc, q, gain, scale, nw, nw + nc, ratio); break;
    default: fit_rows_4(&g, rows, cols, nc, q, gain, scale, nw, nw + nc, ratio); break;
    }
    Py_END_ALLOW_THREADS
    PyMem_Free(nw);
    PyMem_Free(ratio);
    release(&bs);
    Py_RETURN_NONE;
error:
    release(&bs);
    return NULL;
}

PyDoc_STRVAR(row_changes_doc,
"row_changes(w, u, ub, rows, per, out)\nout[r] = 1 where row r of u differs from that of ub (each row compared\n"
"up to its first difference).");

static PyObject *row_changes(PyObject *Py_UNUSED(self), PyObject *args) {
    int w;
    Py_ssize_t rows, per;
    Bufs bs = {0};
    if (!PyArg_ParseTuple(args, "iy*y*nnw*", &w, &bs.b[0], &bs.b[1], &rows, &per, &bs.b[2])) return NULL;
    bs.used = 3;
    if (!width_ok(w) || !product_fits(rows, per, bs.b[0].len / w) || !product_fits(rows, per, bs.b[1].len / w) ||
        bs.b[2].len < rows) {
        fail("bad rows");
        release(&bs);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    uint8_t *out = (uint8_t *)bs.b[2].buf;
    switch (w) {
    case 1: row_changes_1(bs.b[0].buf, bs.b[1].buf, rows, per, out); break;
    case 2: row_changes_2(bs.b[0].buf, bs.b[1].buf, rows, per, out); break;
    case 4: row_changes_4(bs.b[0].buf, bs.b[1].buf, rows, per, out); break;
    default: row_changes_8(bs.b[0].buf, bs.b[1].buf, rows, per, out); break;
    }
    Py_END_ALLOW_THREADS
    release(&bs);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(deflate_huffman_doc,
"deflate_huffman(data, bounds, limit=-1) -> bytes | None\n"
"The raw Deflate stream zlib-ng writes for data with compressobj(9, DEFLATED, 31, 9, Z_HUFFMAN_ONLY), one\n"
"compress() then flush(Z_BLOCK) per piece between the sorted offsets bounds, then flush(Z_FINISH): the same\n"
"bytes (without the gzip header and trailer). None, with nothing written, where limit >= 0 and the stream\n"
"would be longer than limit bytes (its length is known once its blocks are planned).");

static PyObject *deflate_huffman(PyObject *Py_UNUSED(self), PyObject *args) {
    Bufs bs = {0};
    Py_ssize_t limit = -1;
    if (!PyArg_ParseTuple(args, "y*y*|n", &bs.b[0], &bs.b[1], &limit)) return NULL;
    bs.used = 2;
    Py_ssize_t n = bs.b[0].len, nb = bs.b[1].len / 8;
    const int64_t *bounds = (const int64_t *)bs.b[1].buf;
    for (Py_ssize_t k = 0; k < nb; k++) {
        if (bounds[k] < 0 || bounds[k] > n || (k && bounds[k] < bounds[k - 1])) {
            fail("bounds must be sorted offsets inside the data");
            release(&bs);
            return NULL;
        }
    }
    Df *st = PyMem_Malloc(sizeof(Df));
    DfBlock *blocks = PyMem_Malloc(sizeof(DfBlock) * (size_t)df_max_blocks(n, nb));
    if (!st || !blocks) {
        PyMem_Free(st);
        PyMem_Free(blocks);
        release(&bs);
        return PyErr_NoMemory();
    }
    st->blocks = blocks;
    Py_ssize_t want;
    Py_BEGIN_ALLOW_THREADS
    want = df_plan(st, (const uint8_t *)bs.b[0].buf, n, bounds, nb);
    Py_END_ALLOW_THREADS
    PyObject *res = NULL;
    if (limit >= 0 && want > limit) {
        res = Py_None;
        Py_INCREF(res);
    } else if ((res = PyBytes_FromStringAndSize(NULL, want + 8)) != NULL) {  /* 8: df_literals' whole-word store */
        Py_ssize_t got;
        Py_BEGIN_ALLOW_THREADS
        got = df_emit(st, (uint8_t *)PyBytes_AS_STRING(res));
        Py_END_ALLOW_THREADS
        if (got != want) {
            Py_DECREF(res);
            res = NULL;
            PyErr_Format(PyExc_RuntimeError, "deflate_huffman planned %zd bytes but wrote %zd", want, got);
        } else if (_PyBytes_Resize(&res, got) < 0) {
            res = NULL;
        }
    }
    PyMem_Free(blocks);
    PyMem_Free(st);
    release(&bs);
    return res;
}

PyDoc_STRVAR(huffman_floor_doc,
"huffman_floor(data, bounds, stride) -> float\n"
"gpupas.codecs.policy.huffman_floor (the least bytes Huffman-only Deflate needs for data cut at the sorted\n"
"offsets bounds, from every stride-th byte), up to rounding: its sums in another order, C's log2.");

static PyObject *huffman_floor(PyObject *Py_UNUSED(self), PyObject *args) {
    Bufs bs = {0};
    Py_ssize_t stride;
    if (!PyArg_ParseTuple(args, "y*y*n", &bs.b[0], &bs.b[1], &stride)) return NULL;
    bs.used = 2;
    Py_ssize_t n = bs.b[0].len, nb = bs.b[1].len / 8;
    const int64_t *bounds = (const int64_t *)bs.b[1].buf;
    const uint8_t *data = (const uint8_t *)bs.b[0].buf;
    if (stride < 1 || stride > PY_SSIZE_T_MAX / 4) { fail("stride must be positive and sane"); release(&bs); return NULL; }
    for (Py_ssize_t k = 0; k < nb; k++) {
        if (bounds[k] < 0 || bounds[k] > n || (k && bounds[k] < bounds[k - 1])) {
            fail("bounds must be sorted offsets inside the data");
            release(&bs);
            return NULL;
        }
    }
    double total = 0.0;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t k = 0; k <= nb; k++) {
        Py_ssize_t a = k == 0 ? 0 : (Py_ssize_t)bounds[k - 1], b = k == nb ? n : (Py_ssize_t)bounds[k];
        if (b <= a) continue;
        uint32_t hist[4][256] = {{0}};
        Py_ssize_t i = a, j = 0;
        for (; i + 3 * stride < b; i += 4 * stride, j += 4) {
            hist[0][data[i]]++; hist[1][data[i + stride]]++; hist[2][data[i + 2 * stride]]++; hist[3][data[i + 3 * stride]]++;
        }
        for (; i < b; i += stride) hist[0][data[i]]++;
        double tot = 0.0, s = 0.0;
        for (int c = 0; c < 256; c++) {
            uint32_t h = hist[0][c] + hist[1][c] + hist[2][c] + hist[3][c];
            if (h > 1) s += (double)h * log2((double)h);
            tot += h;
        }
        double bits = log2(tot) - s / tot;
        total += tot * (bits > 1.0 ? bits : 1.0);
    }
    Py_END_ALLOW_THREADS
    release(&bs);
    return PyFloat_FromDouble(total * (double)stride / 8.0);
}

PyDoc_STRVAR(range_entropies_doc,
"range_entropies(data, ranges, nlogn, ln2x2, h)\n"
"For each row k of ranges (int64 start, stop, step), into h[k] the Miller-Madow entropy in bits per byte of\n"
"data[start:stop:step] as gpupas.pas.context.count_entropies computes it from the sample's byte counts: the\n"
"same terms (nlogn[c] = c * log2(c) for every count up to the longest sample, computed by NumPy; ln2x2 =\n"
"2 * log(2)) summed in the same order, so the same doubles.");

static PyObject *range_entropies(PyObject *Py_UNUSED(self), PyObject *args) {
    Bufs bs = {0};
    double ln2x2;
    if (!PyArg_ParseTuple(args, "y*y*y*dw*", &bs.b[0], &bs.b[1], &bs.b[2], &ln2x2, &bs.b[3])) return NULL;
    bs.used = 4;
    const uint8_t *data = (const uint8_t *)bs.b[0].buf;
    const int64_t *rg = (const int64_t *)bs.b[1].buf;
    const double *nlogn = (const double *)bs.b[2].buf;
    double *h = (double *)bs.b[3].buf;
    Py_ssize_t n = bs.b[0].len, k = bs.b[1].len / 24, top = bs.b[2].len / 8;
    if (bs.b[3].len / 8 < k) { fail("h too small"); release(&bs); return NULL; }
    for (Py_ssize_t j = 0; j < k; j++) {
        Py_ssize_t a = (Py_ssize_t)rg[3 * j], b = (Py_ssize_t)rg[3 * j + 1];
        if (a < 0 || b > n || rg[3 * j + 2] < 1) {
            fail("ranges must lie inside the data, with positive steps");
            release(&bs);
            return NULL;
        }
        if (b > a && (b - a - 1) / rg[3 * j + 2] + 1 >= top) {
            fail("nlogn must cover every sample's length");
            release(&bs);
            return NULL;
        }
    }
    Py_BEGIN_ALLOW_THREADS
    int64_t row[256];
    for (Py_ssize_t j = 0; j < k; j++) {
        memset(row, 0, sizeof row);
        int64_t m = 0;
        Py_ssize_t st = rg[3 * j + 2] > n ? n + 1 : (Py_ssize_t)rg[3 * j + 2];  /* the same values; i + st cannot overflow */
        for (Py_ssize_t i = (Py_ssize_t)rg[3 * j], b = (Py_ssize_t)rg[3 * j + 1]; i < b; i += st) {
            row[data[i]]++;
            m++;
        }
        double sc = 0.0;
        int64_t nc = 0;
        for (int v = 0; v < 256; v++) {
            if (row[v]) { sc += nlogn[row[v]]; nc++; }
        }
        /* count_entropies: (nf * log2(nf) - sum c * log2(c) + (nonzero - 1) / (2 ln 2)) / nf, 0 for no sample */
        h[j] = m ? (nlogn[m] - sc + (double)(nc - 1) / ln2x2) / (double)m : 0.0;
    }
    Py_END_ALLOW_THREADS
    release(&bs);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"huffman_floor", huffman_floor, METH_VARARGS, huffman_floor_doc},
    {"range_entropies", range_entropies, METH_VARARGS, range_entropies_doc},
    {"deflate_huffman", deflate_huffman, METH_VARARGS, deflate_huffman_doc},
    {"encode", encode, METH_VARARGS, encode_doc},
    {"decode", decode, METH_VARARGS, decode_doc},
    {"copy_rows", copy_rows, METH_VARARGS, copy_rows_doc},
    {"sample_entropies", sample_entropies, METH_VARARGS, sample_entropies_doc},
    {"gather", gather, METH_VARARGS, gather_doc},
    {"fit_rows", fit_rows, METH_VARARGS, fit_rows_doc},
    {"row_changes", row_changes, METH_VARARGS, row_changes_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "gpupas._fastc",
    "Compiled kernels of gpupas's CPU fast path (see gpupas/backend/fast.py).", -1, methods,
    NULL, NULL, NULL, NULL,  /* no slots, traverse, clear or free: every field given (-Wextra) */
};

PyMODINIT_FUNC PyInit__fastc(void) {
    df_init_static();  /* the fixed Huffman tables, once, before any thread may use them */
    return PyModule_Create(&module);
}
