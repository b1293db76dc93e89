/* The kernels of gpupas/_fastc.c for one pattern width: included once per width with
 * W (bytes), T (the unsigned pattern type) and SUF (the name suffix) defined.
 *
 * Every value is handled as a uint64_t holding a W-byte pattern; MASK keeps its bits; S is the signed
 * type of the width. Modes that
 * select a loop (the encoding, the rotation) are arguments of always-inlined bodies, called with
 * constants, so each loop is compiled for its mode with no branch inside.
 */

#define F(name) CAT(name, SUF)
#define BITS (8 * W)
#if W == 8
#define MASK (~(uint64_t)0)
#else
#define MASK ((((uint64_t)1) << BITS) - 1)
#endif

static INLINE uint64_t F(rotl)(uint64_t x, int s) {
    return s ? (((x << 1) | (x >> (BITS - 1))) & MASK) : x;
}

static INLINE uint64_t F(rotr)(uint64_t x, int s) {
    return s ? (((x >> 1) | (x << (BITS - 1))) & MASK) : x;
}

/* kind 0 'mat', 1 'sub' (and 'pred': SUB against the prediction), 2 'xor'; s: the layout rotates (the
 * coded value for 'mat' and 'xor'; for every kind, where the context byte lies) */
static INLINE uint64_t F(code)(uint64_t x, uint64_t b, int kind, int s) {
    if (kind == 0) return F(rotl)(x, s);
    if (kind == 2) return F(rotl)(x ^ b, s);
    uint64_t d = (x - b) & MASK;
    return ((d << 1) ^ ((uint64_t)0 - (d >> (BITS - 1)))) & MASK;
}

static INLINE uint64_t F(uncode)(uint64_t c, uint64_t b, int kind, int s) {
    if (kind == 0) return F(rotr)(c, s);
    if (kind == 2) return F(rotr)(c, s) ^ b;
    uint64_t d = ((c >> 1) ^ ((uint64_t)0 - (c & 1))) & MASK;
    return (d + b) & MASK;
}

/* b + ((a * signed(b - b2) + 4096) >> 13) at the width ('pred' is for widths up to 4 bytes) */
static INLINE uint64_t F(pred)(uint64_t b, uint64_t b2, int16_t a) {
#if W <= 4
    int64_t sd = (int64_t)(S)(T)(b - b2);  /* the change at the width, as a signed number */
    int64_t adj = ((int64_t)a * sd + 4096) >> 13;  /* arithmetic: floor (checked in _fastc.c) */
    return (b + (uint64_t)adj) & MASK;
#else
    (void)b2; (void)a;
    return b;
#endif
}

static INLINE void F(put)(uint8_t *const RESTRICT *p, Py_ssize_t j, uint64_t c, int first) {
#if W == 8
    if (!first) p[0][j] = (uint8_t)(c >> 56);
    p[1][j] = (uint8_t)(c >> 48); p[2][j] = (uint8_t)(c >> 40); p[3][j] = (uint8_t)(c >> 32);
    p[4][j] = (uint8_t)(c >> 24); p[5][j] = (uint8_t)(c >> 16); p[6][j] = (uint8_t)(c >> 8); p[7][j] = (uint8_t)c;
#elif W == 4
    if (!first) p[0][j] = (uint8_t)(c >> 24);
    p[1][j] = (uint8_t)(c >> 16); p[2][j] = (uint8_t)(c >> 8); p[3][j] = (uint8_t)c;
#elif W == 2
    if (!first) p[0][j] = (uint8_t)(c >> 8);
    p[1][j] = (uint8_t)c;
#else
    if (!first) p[0][j] = (uint8_t)c;
#endif
}

static INLINE uint64_t F(get)(const uint8_t *const RESTRICT *p, Py_ssize_t j, int first) {
    uint64_t c = 0;
#if W == 8
    if (!first) c = (uint64_t)p[0][j] << 56;
    c |= ((uint64_t)p[1][j] << 48) | ((uint64_t)p[2][j] << 40) | ((uint64_t)p[3][j] << 32) | ((uint64_t)p[4][j] << 24)
         | ((uint64_t)p[5][j] << 16) | ((uint64_t)p[6][j] << 8) | (uint64_t)p[7][j];
#elif W == 4
    if (!first) c = (uint64_t)p[0][j] << 24;
    c |= ((uint64_t)p[1][j] << 16) | ((uint64_t)p[2][j] << 8) | (uint64_t)p[3][j];
#elif W == 2
    if (!first) c = (uint64_t)p[0][j] << 8;
    c |= (uint64_t)p[1][j];
#else
    if (!first) c = (uint64_t)p[0][j];
#endif
    return c;
}

/* What coded value fi (of coded row r) is coded against: 0, the base, or the prediction. */
static INLINE uint64_t F(against)(const Seg *g, Py_ssize_t fi, Py_ssize_t r, int kind) {
    if (kind == 0) return 0;
    if (kind == 3) return F(pred)(((const T *)g->ub)[fi], ((const T *)g->ub2)[fi], g->alpha[r]);
    return ((const T *)g->ub)[fi];
}

/* -- encoding ------------------------------------------------------------------------------------- */

/* An unmasked segment in order, no prediction, no sort: the loop the compiler vectorizes (each plane a
 * restrict pointer of its own: an array of them keeps it from proving the stores independent). */
static INLINE void F(enc_plain_body)(const Seg *g, uint8_t *const *pl, int kind, int s) {
    const T *RESTRICT u = (const T *)g->u + g->start;
    const T *RESTRICT ub = (const T *)g->ub + g->start;
    const Py_ssize_t n = g->n;
#if W == 8
    uint8_t *RESTRICT p0 = pl[0], *RESTRICT p1 = pl[1], *RESTRICT p2 = pl[2], *RESTRICT p3 = pl[3];
    uint8_t *RESTRICT p4 = pl[4], *RESTRICT p5 = pl[5], *RESTRICT p6 = pl[6], *RESTRICT p7 = pl[7];
    for (Py_ssize_t i = 0; i < n; i++) {
        uint64_t c = F(code)((uint64_t)u[i], kind == 0 ? 0 : (uint64_t)ub[i], kind, s);
        p0[i] = (uint8_t)(c >> 56); p1[i] = (uint8_t)(c >> 48); p2[i] = (uint8_t)(c >> 40); p3[i] = (uint8_t)(c >> 32);
        p4[i] = (uint8_t)(c >> 24); p5[i] = (uint8_t)(c >> 16); p6[i] = (uint8_t)(c >> 8); p7[i] = (uint8_t)c;
    }
#elif W == 4
    uint8_t *RESTRICT p0 = pl[0], *RESTRICT p1 = pl[1], *RESTRICT p2 = pl[2], *RESTRICT p3 = pl[3];
    for (Py_ssize_t i = 0; i < n; i++) {
        uint32_t c = (uint32_t)F(code)((uint64_t)u[i], kind == 0 ? 0 : (uint64_t)ub[i], kind, s);
        p0[i] = (uint8_t)(c >> 24); p1[i] = (uint8_t)(c >> 16); p2[i] = (uint8_t)(c >> 8); p3[i] = (uint8_t)c;
    }
#elif W == 2
    uint8_t *RESTRICT p0 = pl[0], *RESTRICT p1 = pl[1];
    for (Py_ssize_t i = 0; i < n; i++) {
        uint16_t c = (uint16_t)F(code)((uint64_t)u[i], kind == 0 ? 0 : (uint64_t)ub[i], kind, s);
        p0[i] = (uint8_t)(c >> 8); p1[i] = (uint8_t)c;
    }
#else
    uint8_t *RESTRICT p0 = pl[0];
    for (Py_ssize_t i = 0; i < n; i++) p0[i] = (uint8_t)F(code)((uint64_t)u[i], kind == 0 ? 0 : (uint64_t)ub[i], kind, s);
#endif
}

/* Any segment in order: through the row map and/or against the prediction. */
static INLINE void F(enc_any_body)(const Seg *g, uint8_t *const *pl, int kind, int s) {
    const T *RESTRICT u = (const T *)g->u;
    uint8_t *RESTRICT p[8];
    for (int k = 0; k < 8; k++) p[k] = pl[k];
    ROWS_BEGIN(g)
        uint64_t b = F(against)(g, fi, r, kind);
        F(put)(p, i, F(code)((uint64_t)u[fi], b, kind == 3 ? 1 : kind, s), 0);
    ROWS_END
}

/* First pass of a context-split segment: each coded value (cs) and context (ks), where each context
 * group starts (pos), and into sample the histogram of every step-th context byte. */
static INLINE void F(enc_prep_body)(const Seg *g, T *RESTRICT cs, uint8_t *RESTRICT ks, int64_t *pos,
                                    int64_t *sample, Py_ssize_t step, int kind, int s) {
    const T *RESTRICT u = (const T *)g->u;
    const int kshift = BITS - 8 - s;
    int64_t hist[256] = {0};
    Py_ssize_t nxt = 0;
    ROWS_BEGIN(g)
        uint64_t x = u[fi];
        uint64_t b = F(against)(g, fi, r, kind);
        uint8_t key = (uint8_t)((kind == 0 ? x : b) >> kshift);
        cs[i] = (T)F(code)(x, b, kind == 3 ? 1 : kind, s);
        ks[i] = key;
        hist[key]++;
        if (i == nxt) { sample[key]++; nxt += step; }
    ROWS_END
    int64_t acc = 0;
    for (int q = 0; q < 256; q++) { pos[q] = acc; acc += hist[q]; }
}

static void F(enc_plain)(const Seg *g, uint8_t *const *p, int kind, int s) {
    if (kind == 0) { if (s) F(enc_plain_body)(g, p, 0, 1); else F(enc_plain_body)(g, p, 0, 0); }
    else if (kind == 1) F(enc_plain_body)(g, p, 1, 0);
    else { if (s) F(enc_plain_body)(g, p, 2, 1); else F(enc_plain_body)(g, p, 2, 0); }
}

static void F(enc_any)(const Seg *g, uint8_t *const *p, int kind, int s) {
    if (kind == 0) { if (s) F(enc_any_body)(g, p, 0, 1); else F(enc_any_body)(g, p, 0, 0); }
    else if (kind == 1) F(enc_any_body)(g, p, 1, 0);
    else if (kind == 2) { if (s) F(enc_any_body)(g, p, 2, 1); else F(enc_any_body)(g, p, 2, 0); }
    else F(enc_any_body)(g, p, 3, 0);
}

/* The context split: prepare, put each coded value at the next place of its group (one store a value),
 * split the sorted values into planes in order; 'mat' keeps plane 0 (its own context) in natural order. */
static void F(enc_ctx)(const Seg *g, uint8_t *const *p, int kind, int s, int64_t *sample, Py_ssize_t step,
                       void *scratch_cs, uint8_t *ks, void *scratch_sorted) {
    T *cs = (T *)scratch_cs, *srt = (T *)scratch_sorted;
    int64_t pos[256];
    switch (kind) {
    case 0: if (s) F(enc_prep_body)(g, cs, ks, pos, sample, step, 0, 1); else F(enc_prep_body)(g, cs, ks, pos, sample, step, 0, 0); break;
    case 1: if (s) F(enc_prep_body)(g, cs, ks, pos, sample, step, 1, 1); else F(enc_prep_body)(g, cs, ks, pos, sample, step, 1, 0); break;
    case 2: if (s) F(enc_prep_body)(g, cs, ks, pos, sample, step, 2, 1); else F(enc_prep_body)(g, cs, ks, pos, sample, step, 2, 0); break;
    default: if (s) F(enc_prep_body)(g, cs, ks, pos, sample, step, 3, 1); else F(enc_prep_body)(g, cs, ks, pos, sample, step, 3, 0); break;
    }
    const Py_ssize_t n = g->n;
    for (Py_ssize_t i = 0; i < n; i++) srt[pos[ks[i]]++] = cs[i];
    Seg sorted = *g;
    sorted.u = srt; sorted.start = 0;
    F(enc_plain_body)(&sorted, p, 0, 0);
    if (kind == 0) memcpy(p[0], ks, (size_t)n);
}

/* -- decoding ------------------------------------------------------------------------------------- */

static INLINE void F(dec_plain_body)(const Seg *g, const uint8_t *const *pl, T *RESTRICT out, int kind, int s) {
    const T *RESTRICT ub = (const T *)g->ub + g->start;
    const uint8_t *RESTRICT p[8];
    for (int k = 0; k < 8; k++) p[k] = pl[k];
    out += g->start;
    for (Py_ssize_t i = 0; i < g->n; i++) {
        uint64_t b = kind == 0 ? 0 : (uint64_t)ub[i];
        out[i] = (T)F(uncode)(F(get)(p, i, 0), b, kind, s);
    }
}

static INLINE void F(dec_any_body)(const Seg *g, const uint8_t *const *pl, T *RESTRICT out, int kind, int s) {
    const uint8_t *RESTRICT p[8];
    for (int k = 0; k < 8; k++) p[k] = pl[k];
    ROWS_BEGIN(g)
        uint64_t b = F(against)(g, fi, r, kind);
        out[fi] = (T)F(uncode)(F(get)(p, i, 0), b, kind == 3 ? 1 : kind, s);
    ROWS_END
}

/* First pass of decoding a context-split segment: what each value is coded against (bs), its context
 * (ks: the base's or the prediction's top byte; for 'mat' plane 0, stored in natural order) and where
 * each context group starts (pos). */
static INLINE void F(dec_prep_body)(const Seg *g, const uint8_t *p0, T *RESTRICT bs, uint8_t *RESTRICT ks,
                                    int64_t *pos, int kind, int s) {
    const int kshift = BITS - 8 - s;
    int64_t hist[256] = {0};
    ROWS_BEGIN(g)
        uint8_t key;
        if (kind == 0) {
            key = p0[i];
        } else {
            uint64_t b = F(against)(g, fi, r, kind);
            bs[i] = (T)b;
            key = (uint8_t)(b >> kshift);
        }
        ks[i] = key;
        hist[key]++;
    ROWS_END
    int64_t acc = 0;
    for (int q = 0; q < 256; q++) { pos[q] = acc; acc += hist[q]; }
}

/* Second pass: each value from the next place of its context group in the joined sorted planes. */
static INLINE void F(dec_gather_body)(const Seg *g, const T *RESTRICT bs, const uint8_t *RESTRICT ks,
                                      const T *RESTRICT joined, int64_t *pos, T *RESTRICT out, int kind, int s) {
    const uint64_t low = MASK >> 8;
    ROWS_BEGIN(g)
        uint8_t key = ks[i];
        uint64_t c = joined[pos[key]++];
        if (kind == 0) out[fi] = (T)F(rotr)((c & low) | ((uint64_t)key << (BITS - 8)), s);
        else out[fi] = (T)F(uncode)(c, bs[i], kind == 3 ? 1 : kind, s);
    ROWS_END
}

static void F(dec_plain)(const Seg *g, const uint8_t *const *p, T *out, int kind, int s) {
    if (kind == 0) { if (s) F(dec_plain_body)(g, p, out, 0, 1); else F(dec_plain_body)(g, p, out, 0, 0); }
    else if (kind == 1) F(dec_plain_body)(g, p, out, 1, 0);
    else { if (s) F(dec_plain_body)(g, p, out, 2, 1); else F(dec_plain_body)(g, p, out, 2, 0); }
}

static void F(dec_any)(const Seg *g, const uint8_t *const *p, T *out, int kind, int s) {
    if (kind == 0) { if (s) F(dec_any_body)(g, p, out, 0, 1); else F(dec_any_body)(g, p, out, 0, 0); }
    else if (kind == 1) F(dec_any_body)(g, p, out, 1, 0);
    else if (kind == 2) { if (s) F(dec_any_body)(g, p, out, 2, 1); else F(dec_any_body)(g, p, out, 2, 0); }
    else F(dec_any_body)(g, p, out, 3, 0);
}

/* dec_ctx for an unmasked segment that reads no prediction: the context of value i is plane 0's byte ('mat')
 * or the base's top byte, read where it lies; the values are taken in two interleaved halves, each with the
 * places of its own groups (the second half's after the first's), so two chains of place updates run at
 * once where one would wait on the other for a run of one context: the same places, the same output. */
static INLINE void F(dec_ctx_flat_body)(const Seg *g, const uint8_t *const *p, T *RESTRICT out, T *RESTRICT joined,
                                        int kind, int s, int sk) {
    const Py_ssize_t n = g->n, half = n / 2;
    const int kshift = BITS - 8 - sk;  /* sk: where the context byte lies (s: how values are uncoded) */
    const uint64_t low = MASK >> 8;
    const uint8_t *RESTRICT p0 = p[0];
    const T *RESTRICT ub = kind == 0 ? NULL : (const T *)g->ub + g->start;
    int64_t h[4][256];
    memset(h, 0, sizeof(h));
#define KEY_(i) (kind == 0 ? p0[i] : (uint8_t)((uint64_t)ub[i] >> kshift))
    Py_ssize_t i = 0;
    for (; i + 1 < half; i += 2) { h[0][KEY_(i)]++; h[1][KEY_(i + 1)]++; }
    for (; i < half; i++) h[0][KEY_(i)]++;
    for (; i + 1 < n; i += 2) { h[2][KEY_(i)]++; h[3][KEY_(i + 1)]++; }
    for (; i < n; i++) h[2][KEY_(i)]++;
    int64_t pa[256], pb[256], acc = 0;
    for (int q = 0; q < 256; q++) {
        pa[q] = acc;
        pb[q] = acc + h[0][q] + h[1][q];
        acc = pb[q] + h[2][q] + h[3][q];
    }
    Seg sorted = *g;
    sorted.start = 0;
    F(dec_plain_body)(&sorted, p, joined, 0, 0);  /* the sorted planes joined, in order */
    out += g->start;
    for (i = 0; i < half; i++) {
        const Py_ssize_t j = i + half;
        uint8_t ka = KEY_(i), kb = KEY_(j);
        uint64_t ca = joined[pa[ka]++], cb = joined[pb[kb]++];
        if (kind == 0) {
            out[i] = (T)F(rotr)((ca & low) | ((uint64_t)ka << (BITS - 8)), s);
            out[j] = (T)F(rotr)((cb & low) | ((uint64_t)kb << (BITS - 8)), s);
        } else {
            out[i] = (T)F(uncode)(ca, ub[i], kind, s);
            out[j] = (T)F(uncode)(cb, ub[j], kind, s);
        }
    }
    for (Py_ssize_t j = half + i; j < n; j++) {  /* the second half's last value (n odd) */
        uint8_t kb = KEY_(j);
        uint64_t cb = joined[pb[kb]++];
        out[j] = kind == 0 ? (T)F(rotr)((cb & low) | ((uint64_t)kb << (BITS - 8)), s) : (T)F(uncode)(cb, ub[j], kind, s);
    }
#undef KEY_
}

static void F(dec_ctx)(const Seg *g, const uint8_t *const *p, T *out, int kind, int s, void *scratch_bs,
                       uint8_t *ks, void *scratch_joined) {
    T *bs = (T *)scratch_bs, *joined = (T *)scratch_joined;
    int64_t pos[256];
    if (g->nrowmap == 0 && kind != 3) {
        switch (kind) {
        case 0: if (s) F(dec_ctx_flat_body)(g, p, out, joined, 0, 1, 1); else F(dec_ctx_flat_body)(g, p, out, joined, 0, 0, 0); return;
        case 1: if (s) F(dec_ctx_flat_body)(g, p, out, joined, 1, 0, 1); else F(dec_ctx_flat_body)(g, p, out, joined, 1, 0, 0); return;
        default: if (s) F(dec_ctx_flat_body)(g, p, out, joined, 2, 1, 1); else F(dec_ctx_flat_body)(g, p, out, joined, 2, 0, 0); return;
        }
    }
    switch (kind) {
    case 0: F(dec_prep_body)(g, p[0], bs, ks, pos, 0, s); break;
    case 1: F(dec_prep_body)(g, p[0], bs, ks, pos, 1, s); break;
    case 2: F(dec_prep_body)(g, p[0], bs, ks, pos, 2, s); break;
    default: F(dec_prep_body)(g, p[0], bs, ks, pos, 3, s); break;
    }
    Seg sorted = *g;
    sorted.start = 0;
    F(dec_plain_body)(&sorted, p, joined, 0, 0);  /* the sorted planes joined, in order */
    switch (kind) {
    case 0: if (s) F(dec_gather_body)(g, bs, ks, joined, pos, out, 0, 1); else F(dec_gather_body)(g, bs, ks, joined, pos, out, 0, 0); break;
    case 1: F(dec_gather_body)(g, bs, ks, joined, pos, out, 1, 0); break;
    case 2: if (s) F(dec_gather_body)(g, bs, ks, joined, pos, out, 2, 1); else F(dec_gather_body)(g, bs, ks, joined, pos, out, 2, 0); break;
    default: F(dec_gather_body)(g, bs, ks, joined, pos, out, 3, 0); break;
    }
}

/* -- planning ------------------------------------------------------------------------------------- */

/* The sampled entropies of the coded planes of the values at coded positions idx, exactly as the
 * reference's plane_entropies computes them (its byte counts, then its float arithmetic in its order;
 * see entropies() in _fastc.c): hp without a context, and where hj is not NULL conditioned on the
 * context byte. cnt: scratch of W * 256 * 256 counts; coded, keys: scratch of m values. */
static void F(sample_entropies)(const Seg *g, const int64_t *idx, Py_ssize_t m, int kind, int s, const double *nlogn,
                                double ln2x2, double *hp, double *hj, int64_t *cnt, uint64_t *coded, uint8_t *keys) {
    const T *u = (const T *)g->u, *ub = (const T *)g->ub;
    const int kshift = BITS - 8 - s;
    int seen[256] = {0};
    memset(cnt, 0, sizeof(int64_t) * 256 * W);
    for (Py_ssize_t t = 0; t < m; t++) {
        const Py_ssize_t fi = full_index(g, (Py_ssize_t)idx[t]);
        if (t + PREFETCH_AHEAD < m) {  /* a sample's values lie pages apart: ask for them well before they are read */
            const Py_ssize_t fj = full_index(g, (Py_ssize_t)idx[t + PREFETCH_AHEAD]);
            PREFETCH(u + fj);
            if (kind) PREFETCH(ub + fj);
        }
        uint64_t x = u[fi], b = kind == 0 ? 0 : (uint64_t)ub[fi];
        uint64_t c = F(code)(x, b, kind, s);
        coded[t] = c;
        for (int q = 0; q < W; q++) cnt[q * 256 + (int)((c >> (8 * (W - 1 - q))) & 0xFF)]++;
        uint8_t key = (uint8_t)((kind == 0 ? x : b) >> kshift);
        keys[t] = key;
        seen[key] = 1;
    }
    entropies(cnt, W, 1, m, nlogn, ln2x2, hp);
    if (!hj) return;
    int rank[256], k = 0;
    for (int q = 0; q < 256; q++) { rank[q] = k; k += seen[q]; }
    memset(cnt, 0, sizeof(int64_t) * (size_t)W * (size_t)k * 256);
    for (Py_ssize_t t = 0; t < m; t++) {
        uint64_t c = coded[t];
        int q = rank[keys[t]];
        for (int pl = 0; pl < W; pl++) cnt[((Py_ssize_t)pl * k + q) * 256 + (int)((c >> (8 * (W - 1 - pl))) & 0xFF)]++;
    }
    entropies(cnt, W, k, m, nlogn, ln2x2, hj);
}

static void F(gather)(const Seg *g, const int64_t *idx, Py_ssize_t m, T *out) {
    const T *x = (const T *)g->u;
    for (Py_ssize_t t = 0; t < m; t++) {
        out[t] = x[full_index(g, (Py_ssize_t)idx[t])];
    }
}

#if W <= 4
/* Per coded row: the reference fit's factor before its cost test (q), the test's gain and the sum of
 * its absolute terms (the caller re-checks rows near the threshold with NumPy's log2). */
static void F(fit_rows)(const Seg *g, Py_ssize_t rows, const int64_t *cols, Py_ssize_t nc, int16_t *q, double *gain,
                        double *scale, int64_t *nw, int64_t *last, double *ratio) {
    const T *u = (const T *)g->u, *ub = (const T *)g->ub, *ub2 = (const T *)g->ub2;
    const double factor = (double)g->per / (double)nc;
    for (Py_ssize_t r = 0; r < rows; r++) {
        Py_ssize_t base = (g->nrowmap ? (Py_ssize_t)g->rowmap[r] : r) * g->per;
        Py_ssize_t k = 0;
        q[r] = 0; gain[r] = 0.0; scale[r] = 0.0;
        for (Py_ssize_t j = 0; j < nc; j++) {
            Py_ssize_t fi = base + (Py_ssize_t)cols[j];
            uint64_t x = u[fi], b = ub[fi], b2 = ub2[fi];
            int64_t v1 = (int64_t)(S)(T)(x - b), v2 = (int64_t)(S)(T)(b - b2);
            nw[j] = v1; last[j] = v2;
            if (v2 != 0) ratio[k++] = (double)v1 / (double)v2;
        }
        if (k == 0) continue;
        Py_ssize_t h = k / 2;
        select_nth(ratio, k, h);
        double hi = ratio[h], lo = hi;
        if ((k - 1) / 2 < h) { lo = ratio[0]; for (Py_ssize_t j = 1; j < h; j++) if (ratio[j] > lo) lo = ratio[j]; }
        double qa = nearbyint((lo + hi) / 2 * 8192.0);
        if (qa < -32768.0) qa = -32768.0;
        if (qa > 32767.0) qa = 32767.0;
        int64_t qi = (int64_t)qa;
        q[r] = (int16_t)qi;
        if (qi == 0) continue;  /* the residual is the change itself: the reference's gain is exactly 0 */
        double pa = 1.0, pb = 1.0, ga = 0.0, gb = 0.0;
        for (Py_ssize_t j = 0; j < nc; j++) {
            int64_t res = nw[j] - ((qi * last[j] + 4096) >> 13);
            pa *= (double)(nw[j] < 0 ? -nw[j] : nw[j]) + 1.0;
            pb *= (double)(res < 0 ? -res : res) + 1.0;
            if ((j & 7) == 7) { ga += log2(pa); gb += log2(pb); pa = 1.0; pb = 1.0; }
        }
        ga += log2(pa); gb += log2(pb);
        gain[r] = (ga - gb) * factor;
        scale[r] = (ga + gb) * factor;
    }
}
#endif

static void F(row_changes)(const void *uv, const void *ubv, Py_ssize_t rows, Py_ssize_t per, uint8_t *out) {
    const T *u = (const T *)uv, *ub = (const T *)ubv;
    for (Py_ssize_t r = 0; r < rows; r++) {
        const T *a = u + r * per, *b = ub + r * per;
        uint8_t changed = 0;
        for (Py_ssize_t j = 0; j < per; j++) if (a[j] != b[j]) { changed = 1; break; }
        out[r] = changed;
    }
}

#undef F
#undef BITS
#undef MASK
