/* Huffman-only Deflate, byte for byte the stream zlib-ng writes for gpupas's Deflate chunks
 * (gpupas/codecs/deflate.py: compressobj(9, DEFLATED, 31, 9, Z_HUFFMAN_ONLY), one compress() then
 * flush(Z_BLOCK) per piece between block bounds, then flush(Z_FINISH)), without zlib-ng's symbol buffer:
 * each block's literal counts, its trees and its choice of stored, fixed or dynamic coding, then a
 * table-driven bit writer. Included by _fastc.c.
 *
 * Altered from zlib-ng's trees.c, deflate.c and deflate_huff.c (zlib license):
 *   Copyright (C) 1995-2024 Jean-loup Gailly and Mark Adler; zlib-ng authors.
 *   This software is provided 'as-is', without any express or implied warranty. Permission is granted
 *   to anyone to use this software for any purpose, including commercial applications, and to alter it
 *   and redistribute it freely, subject to: 1. The origin of this software must not be misrepresented.
 *   2. Altered source versions must be plainly marked as such, and must not be misrepresented as being
 *   the original software. 3. This notice may not be removed or altered from any source distribution.
 * Altered: literals only (no matches), the window and symbol buffer kept only as the counters that
 * decide block ends and whether a stored block is possible, the gzip header and trailer left to the
 * caller. tests/test_fast.py checks the output against zlib-ng's.
 */

#define DF_L_CODES 286
#define DF_D_CODES 30
#define DF_BL_CODES 19
#define DF_HEAP_SIZE (2 * DF_L_CODES + 1)
#define DF_MAX_BITS 15
#define DF_MAX_BL_BITS 7
#define DF_END_BLOCK 256
#define DF_REP_3_6 16
#define DF_REPZ_3_10 17
#define DF_REPZ_11_138 18
#define DF_SYM_END 32767            /* lit_bufsize - 1 at memLevel 9: a block's most literals */
#define DF_WSIZE 32768              /* windowBits 15 */
#define DF_WINDOW_SIZE (2 * DF_WSIZE)
#define DF_MIN_LOOKAHEAD (258 + 3 + 1)
#define DF_MAX_DIST (DF_WSIZE - DF_MIN_LOOKAHEAD)

typedef struct {
    uint16_t freq[DF_HEAP_SIZE], code[DF_HEAP_SIZE], dad[DF_HEAP_SIZE], len[DF_HEAP_SIZE];
} DfTree;

typedef struct {
    DfTree *tree;
    const uint16_t *stree_len;  /* static tree lengths, or NULL */
    const int *extra;
    int extra_base, elems, max_length, max_code;
} DfDesc;

typedef struct {
    DfTree lt, dt, bt;
    DfDesc ld, dd, bd;
    int heap[DF_HEAP_SIZE], heap_len, heap_max;
    uint8_t depth[DF_HEAP_SIZE];
    uint32_t key[DF_HEAP_SIZE];  /* DF_KEY of each node in the heap */
    uint16_t bl_count[DF_MAX_BITS + 1];
    int64_t opt_len, static_len;
    uint64_t bits;       /* bit buffer, LSB first */
    int nbits;
    uint8_t *out;        /* output cursor */
    struct DfBlock *blocks;  /* the plan: each block's coding, in order */
    Py_ssize_t nblocks;
    int64_t total;       /* the stream's length in bits so far, as planned */
} Df;

/* One planned block: what df_emit_block needs to write it (the trees' lengths and codes, copied). */
typedef struct DfBlock {
    const uint8_t *data;
    Py_ssize_t n;
    int type, last;      /* 0 stored, 1 fixed, 2 dynamic, 3 an empty fixed block */
    int lcodes, dcodes, blcodes;
    uint16_t lcode[DF_L_CODES], llen[DF_L_CODES + 1], dlen[DF_D_CODES + 1];  /* lens: a guard after the last */
    uint16_t bcode[DF_BL_CODES], blen[DF_BL_CODES];
} DfBlock;

static const int df_extra_lbits[29] = {0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0};
static const int df_extra_dbits[30] = {0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13};
static const int df_extra_blbits[19] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 3, 7};
static const uint8_t df_bl_order[19] = {16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15};

static uint16_t df_static_llen[288], df_static_lcode[288], df_static_dlen[30];
static int df_ready = 0;

static uint16_t df_reverse(unsigned code, int len) {
    unsigned r = 0;
    for (int i = 0; i < len; i++) { r = (r << 1) | (code & 1); code >>= 1; }
    return (uint16_t)r;
}

static void df_gen_codes(uint16_t *code, const uint16_t *len, int max_code, const uint16_t *bl_count) {
    uint16_t next_code[DF_MAX_BITS + 1];
    unsigned c = 0;
    for (int bits = 1; bits <= DF_MAX_BITS; bits++) {
        c = (c + bl_count[bits - 1]) << 1;
        next_code[bits] = (uint16_t)c;
    }
    for (int n = 0; n <= max_code; n++) {
        int l = len[n];
        if (l == 0) continue;
        code[n] = df_reverse(next_code[l]++, l);
    }
}

static void df_init_static(void) {
    if (df_ready) return;
    uint16_t bl_count[DF_MAX_BITS + 1] = {0};
    for (int n = 0; n < 288; n++) {
        df_static_llen[n] = n < 144 ? 8 : n < 256 ? 9 : n < 280 ? 7 : 8;
        bl_count[df_static_llen[n]]++;
    }
    df_gen_codes(df_static_lcode, df_static_llen, 287, bl_count);
    for (int n = 0; n < 30; n++) df_static_dlen[n] = 5;
    df_ready = 1;
}

/* -- bits out (LSB first) ---------------------------------------------------------------------------- */
static INLINE void df_put(Df *s, uint64_t value, int len) {
    s->bits |= value << s->nbits;
    s->nbits += len;
    if (s->nbits >= 32) {
        uint32_t w = (uint32_t)s->bits;
        memcpy(s->out, &w, 4);  /* little-endian machines only (gpupas refuses others) */
        s->out += 4;
        s->bits >>= 32;
        s->nbits -= 32;
    }
}

static void df_align(Df *s) {  /* bi_windup: the remaining bits, zero-padded to a byte */
    while (s->nbits > 0) {
        *s->out++ = (uint8_t)s->bits;
        s->bits >>= 8;
        s->nbits -= 8;
    }
    s->bits = 0;
    s->nbits = 0;
}

/* -- trees (zlib-ng trees.c) --------------------------------------------------------------------------- */
/* zlib-ng's smaller(n, m): freq[n] < freq[m], or equal and depth[n] <= depth[m], is key[n] <= key[m] with
 * key = freq << 8 | depth (a depth stays below 256: frequencies of at most 32768 keep a tree shallower
 * than 30). One compare, so the sift below picks the child without a branch. */
#define DF_KEY(freq, depth) (((uint32_t)(freq) << 8) | (uint32_t)(depth))

static void df_pqdownheap(Df *s, int k) {
    int *heap = s->heap;
    const uint32_t *key = s->key;
    const int len = s->heap_len;
    int v = heap[k];
    const uint32_t kv = key[v];
    int j = k << 1;
    while (j <= len) {
        int c = heap[j];
        uint32_t kc = key[c];
        if (j < len) {  /* the right child where it is smaller or equal (zlib-ng's order) */
            int r = heap[j + 1];
            uint32_t kr = key[r];
            int take = kr <= kc;
            j += take;
            c = take ? r : c;
            kc = take ? kr : kc;
        }
        if (kv <= kc) break;
        heap[k] = c;
        k = j;
        j <<= 1;
    }
    heap[k] = v;
}

static void df_gen_bitlen(Df *s, DfDesc *desc) {
    DfTree *t = desc->tree;
    int max_code = desc->max_code, base = desc->extra_base, max_length = desc->max_length;
    const uint16_t *stree = desc->stree_len;
    const int *extra = desc->extra;
    int h, n, m, overflow = 0;
    for (int bits = 0; bits <= DF_MAX_BITS; bits++) s->bl_count[bits] = 0;
    t->len[s->heap[s->heap_max]] = 0;
    for (h = s->heap_max + 1; h < DF_HEAP_SIZE; h++) {
        n = s->heap[h];
        int bits = t->len[t->dad[n]] + 1;
        if (bits > max_length) { bits = max_length; overflow++; }
        t->len[n] = (uint16_t)bits;
        if (n > max_code) continue;
        s->bl_count[bits]++;
        int xbits = n >= base ? extra[n - base] : 0;
        uint16_t f = t->freq[n];
        s->opt_len += (int64_t)f * (bits + xbits);
        if (stree) s->static_len += (int64_t)f * (stree[n] + xbits);
    }
    if (overflow == 0) return;
    do {
        int bits = max_length - 1;
        while (s->bl_count[bits] == 0) bits--;
        s->bl_count[bits]--;
        s->bl_count[bits + 1] += 2;
        s->bl_count[max_length]--;
        overflow -= 2;
    } while (overflow > 0);
    for (int bits = max_length; bits != 0; bits--) {
        n = s->bl_count[bits];
        while (n != 0) {
            m = s->heap[--h];
            if (m > max_code) continue;
            if (t->len[m] != bits) {
                s->opt_len += (int64_t)bits * t->freq[m];
                s->opt_len -= (int64_t)t->len[m] * t->freq[m];
                t->len[m] = (uint16_t)bits;
            }
            n--;
        }
    }
}

static void df_build_tree(Df *s, DfDesc *desc) {
    DfTree *t = desc->tree;
    const uint16_t *stree = desc->stree_len;
    int elems = desc->elems, n, m, max_code = -1, node;
    s->heap_len = 0;
    s->heap_max = DF_HEAP_SIZE;
    for (n = 0; n < elems; n++) {
        if (t->freq[n] != 0) {
            s->heap[++(s->heap_len)] = max_code = n;
            s->depth[n] = 0;
            s->key[n] = DF_KEY(t->freq[n], 0);
        } else {
            t->len[n] = 0;
        }
    }
    while (s->heap_len < 2) {
        node = s->heap[++(s->heap_len)] = (max_code < 2 ? ++max_code : 0);
        t->freq[node] = 1;
        s->depth[node] = 0;
        s->key[node] = DF_KEY(1, 0);
        s->opt_len--;
        if (stree) s->static_len -= stree[node];
    }
    desc->max_code = max_code;
    for (n = s->heap_len / 2; n >= 1; n--) df_pqdownheap(s, n);
    node = elems;
    do {
        n = s->heap[1];
        s->heap[1] = s->heap[s->heap_len--];
        df_pqdownheap(s, 1);
        m = s->heap[1];
        s->heap[--(s->heap_max)] = n;
        s->heap[--(s->heap_max)] = m;
        t->freq[node] = (uint16_t)(t->freq[n] + t->freq[m]);
        s->depth[node] = (uint8_t)((s->depth[n] >= s->depth[m] ? s->depth[n] : s->depth[m]) + 1);
        s->key[node] = DF_KEY(t->freq[node], s->depth[node]);
        t->dad[n] = t->dad[m] = (uint16_t)node;
        s->heap[1] = node++;
        df_pqdownheap(s, 1);
    } while (s->heap_len >= 2);
    s->heap[--(s->heap_max)] = s->heap[1];
    df_gen_bitlen(s, desc);
    df_gen_codes(t->code, t->len, max_code, s->bl_count);
}

static void df_scan_tree(Df *s, DfTree *t, int max_code) {
    int prevlen = -1, curlen, nextlen = t->len[0], count = 0, max_count = 7, min_count = 4;
    if (nextlen == 0) { max_count = 138; min_count = 3; }
    t->len[max_code + 1] = 0xffff;  /* guard */
    for (int n = 0; n <= max_code; n++) {
        curlen = nextlen;
        nextlen = t->len[n + 1];
        if (++count < max_count && curlen == nextlen) {
            continue;
        } else if (count < min_count) {
            s->bt.freq[curlen] = (uint16_t)(s->bt.freq[curlen] + count);
        } else if (curlen != 0) {
            if (curlen != prevlen) s->bt.freq[curlen]++;
            s->bt.freq[DF_REP_3_6]++;
        } else if (count <= 10) {
            s->bt.freq[DF_REPZ_3_10]++;
        } else {
            s->bt.freq[DF_REPZ_11_138]++;
        }
        count = 0;
        prevlen = curlen;
        if (nextlen == 0) { max_count = 138; min_count = 3; }
        else if (curlen == nextlen) { max_count = 6; min_count = 3; }
        else { max_count = 7; min_count = 4; }
    }
}

static void df_send_tree(Df *s, const uint16_t *len, int max_code, const uint16_t *bcode, const uint16_t *blen) {
    int prevlen = -1, curlen, nextlen = len[0], count = 0, max_count = 7, min_count = 4;
    if (nextlen == 0) { max_count = 138; min_count = 3; }
    for (int n = 0; n <= max_code; n++) {
        curlen = nextlen;
        nextlen = len[n + 1];
        if (++count < max_count && curlen == nextlen) {
            continue;
        } else if (count < min_count) {
            do { df_put(s, bcode[curlen], blen[curlen]); } while (--count != 0);
        } else if (curlen != 0) {
            if (curlen != prevlen) { df_put(s, bcode[curlen], blen[curlen]); count--; }
            df_put(s, bcode[DF_REP_3_6], blen[DF_REP_3_6]);
            df_put(s, (uint64_t)(count - 3), 2);
        } else if (count <= 10) {
            df_put(s, bcode[DF_REPZ_3_10], blen[DF_REPZ_3_10]);
            df_put(s, (uint64_t)(count - 3), 3);
        } else {
            df_put(s, bcode[DF_REPZ_11_138], blen[DF_REPZ_11_138]);
            df_put(s, (uint64_t)(count - 11), 7);
        }
        count = 0;
        prevlen = curlen;
        if (nextlen == 0) { max_count = 138; min_count = 3; }
        else if (curlen == nextlen) { max_count = 6; min_count = 3; }
        else { max_count = 7; min_count = 4; }
    }
}

/* The literals data[0:n] in codes of (code, len), then the end of block: three codes (at most 45 bits)
 * added to the bit buffer, then its whole bytes stored with one unconditional 8-byte write (no branch
 * on the bit count: its outcome follows the data). */
static void df_literals(Df *s, const uint8_t *data, Py_ssize_t n, const uint16_t *code, const uint16_t *len) {
    uint32_t tab[256];
    for (int b = 0; b < 256; b++) tab[b] = (uint32_t)code[b] | ((uint32_t)len[b] << 16);
    uint64_t bits = s->bits;
    int nbits = s->nbits;
    uint8_t *out = s->out;
    while (nbits >= 8) {  /* at most 7 bits pending at each step below: 7 + 3 * 15 fit the 64 */
        *out++ = (uint8_t)bits;
        bits >>= 8;
        nbits -= 8;
    }
    Py_ssize_t i = 0;
    for (; i + 3 <= n; i += 3) {
        uint32_t a = tab[data[i]], b = tab[data[i + 1]], c = tab[data[i + 2]];
        bits |= (uint64_t)(a & 0xFFFF) << nbits;
        nbits += (int)(a >> 16);
        bits |= (uint64_t)(b & 0xFFFF) << nbits;
        nbits += (int)(b >> 16);
        bits |= (uint64_t)(c & 0xFFFF) << nbits;
        nbits += (int)(c >> 16);
        memcpy(out, &bits, 8);  /* little-endian machines only (gpupas refuses others) */
        int whole = nbits >> 3;
        out += whole;
        bits = whole ? bits >> (whole << 3) : bits;
        nbits &= 7;
    }
    s->bits = bits;
    s->nbits = nbits;
    s->out = out;
    for (; i < n; i++) df_put(s, code[data[i]], len[data[i]]);
    df_put(s, code[DF_END_BLOCK], len[DF_END_BLOCK]);
}

/* zng_tr_flush_block for a block of literals data[0:n] (buf_ok where zlib-ng still has them in its window),
 * planned, not written: its coding is recorded in the next DfBlock and its bits added to s->total. */
static void df_plan_block(Df *s, const uint8_t *data, Py_ssize_t n, int buf_ok, int last) {
    DfBlock *b = &s->blocks[s->nblocks++];
    int64_t opt_lenb, static_lenb;
    int max_blindex = 0;
    b->data = data;
    b->n = n;
    b->last = last;
    if (n == 0) {  /* an empty static block */
        b->type = 3;
        s->total += 3 + df_static_llen[DF_END_BLOCK];
        if (last) s->total = (s->total + 7) & ~(int64_t)7;
        return;
    }
    memset(s->lt.freq, 0, sizeof(s->lt.freq));
    memset(s->dt.freq, 0, sizeof(s->dt.freq));
    memset(s->bt.freq, 0, sizeof(s->bt.freq));
    s->lt.freq[DF_END_BLOCK] = 1;
    s->opt_len = s->static_len = 0;
    uint32_t hist[4][256] = {{0}};  /* four tables: a run of one byte value does not serialize on one counter */
    Py_ssize_t i = 0;
    for (; i + 4 <= n; i += 4) {
        hist[0][data[i]]++;
        hist[1][data[i + 1]]++;
        hist[2][data[i + 2]]++;
        hist[3][data[i + 3]]++;
    }
    for (; i < n; i++) hist[0][data[i]]++;
    for (int c = 0; c < 256; c++) s->lt.freq[c] = (uint16_t)(hist[0][c] + hist[1][c] + hist[2][c] + hist[3][c]);
    s->ld.max_code = s->dd.max_code = s->bd.max_code = 0;
    df_build_tree(s, &s->ld);
    df_build_tree(s, &s->dd);
    df_scan_tree(s, &s->lt, s->ld.max_code);
    df_scan_tree(s, &s->dt, s->dd.max_code);
    df_build_tree(s, &s->bd);
    for (max_blindex = DF_BL_CODES - 1; max_blindex >= 3; max_blindex--)
        if (s->bt.len[df_bl_order[max_blindex]] != 0) break;
    s->opt_len += 3 * ((int64_t)max_blindex + 1) + 5 + 5 + 4;
    opt_lenb = (s->opt_len + 3 + 7) >> 3;
    static_lenb = (s->static_len + 3 + 7) >> 3;
    if (static_lenb <= opt_lenb) opt_lenb = static_lenb;
    if (n + 4 <= opt_lenb && buf_ok) {  /* stored: 3 bits, then whole bytes */
        b->type = 0;
        s->total = ((s->total + 3 + 7) & ~(int64_t)7) + 8 * (4 + (int64_t)n);
    } else if (static_lenb == opt_lenb) {
        b->type = 1;
        s->total += 3 + s->static_len;
    } else {
        b->type = 2;
        b->lcodes = s->ld.max_code + 1;
        b->dcodes = s->dd.max_code + 1;
        b->blcodes = max_blindex + 1;
        memcpy(b->lcode, s->lt.code, sizeof(b->lcode));
        memcpy(b->llen, s->lt.len, sizeof(uint16_t) * ((size_t)b->lcodes + 1));  /* with df_scan_tree's guard */
        memcpy(b->dlen, s->dt.len, sizeof(uint16_t) * ((size_t)b->dcodes + 1));
        memcpy(b->bcode, s->bt.code, sizeof(b->bcode));
        memcpy(b->blen, s->bt.len, sizeof(b->blen));
        s->total += 3 + s->opt_len;
    }
    if (last) s->total = (s->total + 7) & ~(int64_t)7;
}

/* Write a planned block (zng_tr_flush_block's output). */
static void df_emit_block(Df *s, const DfBlock *b) {
    if (b->type == 3) {
        df_put(s, (1 << 1) + b->last, 3);
        df_put(s, df_static_lcode[DF_END_BLOCK], df_static_llen[DF_END_BLOCK]);
    } else if (b->type == 0) {
        df_put(s, (0 << 1) + b->last, 3);
        df_align(s);
        uint16_t l = (uint16_t)b->n, nl = (uint16_t)~b->n;
        memcpy(s->out, &l, 2);
        memcpy(s->out + 2, &nl, 2);
        memcpy(s->out + 4, b->data, (size_t)b->n);
        s->out += 4 + b->n;
    } else if (b->type == 1) {
        df_put(s, (1 << 1) + b->last, 3);
        df_literals(s, b->data, b->n, df_static_lcode, df_static_llen);
    } else {
        df_put(s, (2 << 1) + b->last, 3);
        df_put(s, (uint64_t)(b->lcodes - 257), 5);
        df_put(s, (uint64_t)(b->dcodes - 1), 5);
        df_put(s, (uint64_t)(b->blcodes - 4), 4);
        for (int rank = 0; rank < b->blcodes; rank++) df_put(s, b->blen[df_bl_order[rank]], 3);
        df_send_tree(s, b->llen, b->lcodes - 1, b->bcode, b->blen);
        df_send_tree(s, b->dlen, b->dcodes - 1, b->bcode, b->blen);
        df_literals(s, b->data, b->n, b->lcode, b->llen);
    }
    if (b->last) df_align(s);
}

/* The most blocks df_plan may record for n bytes cut at nbounds offsets. */
static Py_ssize_t df_max_blocks(Py_ssize_t n, Py_ssize_t nbounds) { return n / (DF_SYM_END - 1) + 2 * nbounds + 4; }

/* Plan the Deflate stream (no gzip framing) of data cut at bounds into s->blocks (room for
 * df_max_blocks(n, nbounds)); returns its length in bytes. df_emit then writes it. */
static Py_ssize_t df_plan(Df *s, const uint8_t *data, Py_ssize_t n, const int64_t *bounds, Py_ssize_t nbounds) {
    s->ld = (DfDesc){&s->lt, df_static_llen, df_extra_lbits, 257, DF_L_CODES, DF_MAX_BITS, 0};
    s->dd = (DfDesc){&s->dt, df_static_dlen, df_extra_dbits, 0, DF_D_CODES, DF_MAX_BITS, 0};
    s->bd = (DfDesc){&s->bt, NULL, df_extra_blbits, 0, DF_BL_CODES, DF_MAX_BL_BITS, 0};
    s->nblocks = 0;
    s->total = 0;
    /* zlib-ng's counters: where literals are in its window, where the block started, how many are in it */
    int64_t strstart = 0, lookahead = 0, block_start = 0;
    Py_ssize_t consumed = 0, sym = 0;
    for (Py_ssize_t k = 0; k <= nbounds; k++) {
        Py_ssize_t p0 = k == 0 ? 0 : (Py_ssize_t)bounds[k - 1];
        Py_ssize_t p1 = k == nbounds ? n : (Py_ssize_t)bounds[k];
        if (p1 <= p0) continue;  /* an empty piece is not passed to zlib-ng */
        Py_ssize_t avail = p1 - p0;
        for (int flush = 0; flush < 2; flush++) {  /* compress(piece), then flush(Z_BLOCK) */
            for (;;) {
                if (lookahead == 0) {  /* fill_window */
                    do {
                        int64_t more = DF_WINDOW_SIZE - lookahead - strstart;
                        if (strstart >= DF_WSIZE + DF_MAX_DIST) {
                            strstart -= DF_WSIZE;
                            block_start -= DF_WSIZE;
                            more += DF_WSIZE;
                        }
                        if (avail == 0) break;
                        int64_t got = avail < more ? avail : more;
                        avail -= got;
                        lookahead += got;
                    } while (lookahead < DF_MIN_LOOKAHEAD && avail != 0);
                    if (lookahead == 0) break;
                }
                int64_t take = DF_SYM_END - sym;
                if (take > lookahead) take = lookahead;
                sym += take;
                lookahead -= take;
                strstart += take;
                consumed += take;
                if (sym == DF_SYM_END) {
                    df_plan_block(s, data + consumed - sym, sym, block_start >= 0, 0);
                    block_start = strstart;
                    sym = 0;
                }
            }
            if (flush && sym) {
                df_plan_block(s, data + consumed - sym, sym, block_start >= 0, 0);
                block_start = strstart;
                sym = 0;
            }
        }
    }
    /* flush(Z_FINISH): fill_window may still slide; then the last block (empty: a static one) */
    if (strstart >= DF_WSIZE + DF_MAX_DIST) { strstart -= DF_WSIZE; block_start -= DF_WSIZE; }
    df_plan_block(s, data + consumed - sym, sym, block_start >= 0, 1);
    return (Py_ssize_t)(s->total >> 3);
}

/* Write the planned stream to out (df_plan's length); returns the bytes written. */
static Py_ssize_t df_emit(Df *s, uint8_t *out) {
    s->bits = 0;
    s->nbits = 0;
    s->out = out;
    for (Py_ssize_t k = 0; k < s->nblocks; k++) df_emit_block(s, &s->blocks[k]);
    return (Py_ssize_t)(s->out - out);
}
