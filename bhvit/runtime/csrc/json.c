/* json.c -- see json.h.  Recursive descent over a length-bounded buffer. */
#include "json.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

#define MAX_DEPTH 64
#define MAX_OBJECT_KEYS ((size_t)1 << 20) /* no manifest or safetensors header has more */

typedef struct {
    const char *s;
    size_t n, pos;
    char *err;
    size_t errlen;
} parser;

static int fail(parser *p, const char *what)
{
    if (p->err && p->errlen)
        snprintf(p->err, p->errlen, "%s at byte %zu", what, p->pos);
    return -1;
}

static void skip_ws(parser *p)
{
    while (p->pos < p->n && (p->s[p->pos] == ' ' || p->s[p->pos] == '\t' || p->s[p->pos] == '\n' ||
                             p->s[p->pos] == '\r'))
        p->pos++;
}

static int lit(parser *p, const char *word)
{
    const size_t k = strlen(word);
    if (p->n - p->pos < k || memcmp(p->s + p->pos, word, k) != 0)
        return fail(p, "invalid literal");
    p->pos += k;
    return 0;
}

static int hex4(parser *p, unsigned *out)
{
    unsigned v = 0;
    if (p->n - p->pos < 4)
        return fail(p, "truncated \\u escape");
    for (int i = 0; i < 4; ++i) {
        const char c = p->s[p->pos++];
        v <<= 4;
        if (c >= '0' && c <= '9')
            v |= (unsigned)(c - '0');
        else if (c >= 'a' && c <= 'f')
            v |= (unsigned)(c - 'a' + 10);
        else if (c >= 'A' && c <= 'F')
            v |= (unsigned)(c - 'A' + 10);
        else
            return fail(p, "bad \\u escape");
    }
    *out = v;
    return 0;
}

/* The length of the well-formed UTF-8 sequence at s (n bytes left), or 0: no overlong
 * forms, no surrogates (U+D800..U+DFFF), nothing above U+10FFFF (what Python's decoder
 * accepts). */
static int utf8_len(const unsigned char *s, size_t n)
{
    const unsigned c = s[0];
    int len;
    unsigned lo = 0x80, hi = 0xBF; /* the second byte's range */
    if (c >= 0xC2 && c <= 0xDF)
        len = 2;
    else if (c >= 0xE0 && c <= 0xEF) {
        len = 3;
        if (c == 0xE0)
            lo = 0xA0;
        else if (c == 0xED)
            hi = 0x9F;
    } else if (c >= 0xF0 && c <= 0xF4) {
        len = 4;
        if (c == 0xF0)
            lo = 0x90;
        else if (c == 0xF4)
            hi = 0x8F;
    } else
        return 0;
    if ((size_t)len > n || s[1] < lo || s[1] > hi)
        return 0;
    for (int i = 2; i < len; ++i)
        if ((s[i] & 0xC0) != 0x80)
            return 0;
    return len;
}

static int parse_string(parser *p, char **out)
{
    /* the decoded string is never longer than its source */
    p->pos++; /* opening quote */
    const size_t start = p->pos;
    size_t end = start;
    while (end < p->n && p->s[end] != '"') {
        if (p->s[end] == '\\')
            end++;
        end++;
    }
    if (end >= p->n)
        return fail(p, "unterminated string");
    char *buf = (char *)malloc(end - start + 1);
    if (!buf)
        return fail(p, "out of memory");
    size_t k = 0;
    while (p->pos < end) {
        unsigned char c = (unsigned char)p->s[p->pos++];
        if (c < 0x20) {
            free(buf);
            return fail(p, "control character in string");
        }
        if (c >= 0x80) { /* a raw multi-byte character: well-formed UTF-8 only */
            const int len = utf8_len((const unsigned char *)p->s + p->pos - 1, end - (p->pos - 1));
            if (!len) {
                free(buf);
                return fail(p, "invalid UTF-8 in string");
            }
            memcpy(buf + k, p->s + p->pos - 1, (size_t)len);
            k += (size_t)len;
            p->pos += (size_t)len - 1;
            continue;
        }
        if (c != '\\') {
            buf[k++] = (char)c;
            continue;
        }
        c = (unsigned char)p->s[p->pos++];
        switch (c) {
        case '"': buf[k++] = '"'; break;
        case '\\': buf[k++] = '\\'; break;
        case '/': buf[k++] = '/'; break;
        case 'b': buf[k++] = '\b'; break;
        case 'f': buf[k++] = '\f'; break;
        case 'n': buf[k++] = '\n'; break;
        case 'r': buf[k++] = '\r'; break;
        case 't': buf[k++] = '\t'; break;
        case 'u': {
            unsigned cp;
            if (hex4(p, &cp)) {
                free(buf);
                return -1;
            }
            if (cp >= 0xD800 && cp < 0xDC00 && p->pos + 6 <= end && p->s[p->pos] == '\\' &&
                p->s[p->pos + 1] == 'u') {
                unsigned lo;
                p->pos += 2;
                if (hex4(p, &lo)) {
                    free(buf);
                    return -1;
                }
                if (lo < 0xDC00 || lo >= 0xE000) {
                    free(buf);
                    return fail(p, "lone surrogate in string");
                }
                cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
            } else if (cp >= 0xD800 && cp < 0xE000) {
                free(buf);
                return fail(p, "lone surrogate in string");
            }
            if (cp == 0) {
                free(buf);
                return fail(p, "NUL in string");
            }
            /* 6 source bytes (\uXXXX) give at most 3 bytes; a pair (12) at most 4 */
            if (cp < 0x80) {
                buf[k++] = (char)cp;
            } else if (cp < 0x800) {
                buf[k++] = (char)(0xC0 | (cp >> 6));
                buf[k++] = (char)(0x80 | (cp & 0x3F));
            } else if (cp < 0x10000) {
                buf[k++] = (char)(0xE0 | (cp >> 12));
                buf[k++] = (char)(0x80 | ((cp >> 6) & 0x3F));
                buf[k++] = (char)(0x80 | (cp & 0x3F));
            } else {
                buf[k++] = (char)(0xF0 | (cp >> 18));
                buf[k++] = (char)(0x80 | ((cp >> 12) & 0x3F));
                buf[k++] = (char)(0x80 | ((cp >> 6) & 0x3F));
                buf[k++] = (char)(0x80 | (cp & 0x3F));
            }
            break;
        }
        default:
            free(buf);
            return fail(p, "bad escape in string");
        }
    }
    buf[k] = 0;
    p->pos = end + 1;
    *out = buf;
    return 0;
}

static int digits(parser *p)
{
    const size_t start = p->pos;
    while (p->pos < p->n && p->s[p->pos] >= '0' && p->s[p->pos] <= '9')
        p->pos++;
    return p->pos > start;
}

/* JSON's number grammar exactly: -?(0|[1-9][0-9]*)(.[0-9]+)?([eE][+-]?[0-9]+)? (no leading
 * zeros, no hex); an integer literal must fit int64 (as Python's reader requires of a manifest) */
static int parse_number(parser *p, jval *v)
{
    const size_t start = p->pos;
    int is_int = 1;
    if (p->pos < p->n && p->s[p->pos] == '-')
        p->pos++;
    if (p->pos < p->n && p->s[p->pos] == '0')
        p->pos++;
    else if (!digits(p))
        return fail(p, "bad number");
    if (p->pos < p->n && p->s[p->pos] == '.') {
        p->pos++;
        is_int = 0;
        if (!digits(p))
            return fail(p, "bad number");
    }
    if (p->pos < p->n && (p->s[p->pos] == 'e' || p->s[p->pos] == 'E')) {
        p->pos++;
        is_int = 0;
        if (p->pos < p->n && (p->s[p->pos] == '+' || p->s[p->pos] == '-'))
            p->pos++;
        if (!digits(p))
            return fail(p, "bad number");
    }
    if (p->pos < p->n && p->s[p->pos] >= '0' && p->s[p->pos] <= '9')
        return fail(p, "bad number"); /* a leading zero: 02 */
    const size_t len = p->pos - start;
    if (len > 400)
        return fail(p, "number literal too long");
    char tmp[401];
    memcpy(tmp, p->s + start, len);
    tmp[len] = 0;
    char *endp;
    v->type = J_NUM;
    v->num = strtod(tmp, &endp);
    if (*endp != 0)
        return fail(p, "bad number");
    v->is_int = 0;
    if (is_int) {
        errno = 0;
        long long ll = strtoll(tmp, &endp, 10);
        if (errno != 0 || *endp != 0)
            return fail(p, "integer out of the 64-bit range");
        v->is_int = 1;
        v->i = (int64_t)ll;
    }
    return 0;
}

static int parse_value(parser *p, jval *v, int depth);

static int grow(parser *p, jval *v, size_t *cap, int with_keys)
{
    if (v->n < *cap)
        return 0;
    const size_t nc = *cap ? 2 * *cap : 8;
    jval *it = (jval *)realloc(v->items, nc * sizeof(jval));
    if (!it)
        return fail(p, "out of memory");
    v->items = it;
    if (with_keys) {
        char **ks = (char **)realloc(v->keys, nc * sizeof(char *));
        if (!ks)
            return fail(p, "out of memory");
        v->keys = ks;
    }
    *cap = nc;
    return 0;
}

static int parse_container(parser *p, jval *v, int depth, int obj)
{
    const char close = obj ? '}' : ']';
    size_t cap = 0;
    v->type = obj ? J_OBJ : J_ARR;
    p->pos++;
    skip_ws(p);
    if (p->pos < p->n && p->s[p->pos] == close) {
        p->pos++;
        return 0;
    }
    for (;;) {
        if (obj && v->n >= MAX_OBJECT_KEYS)
            return fail(p, "an object with more than 1048576 keys");
        if (grow(p, v, &cap, obj))
            return -1;
        char *key = NULL;
        skip_ws(p);
        if (obj) {
            if (p->pos >= p->n || p->s[p->pos] != '"')
                return fail(p, "expected a string key");
            if (parse_string(p, &key))
                return -1;
            skip_ws(p);
            if (p->pos >= p->n || p->s[p->pos] != ':') {
                free(key);
                return fail(p, "expected ':'");
            }
            p->pos++;
        }
        jval *item = &v->items[v->n];
        memset(item, 0, sizeof(*item));
        if (obj)
            v->keys[v->n] = key;
        v->n++; /* counted before parsing, so that bhvi_json_free frees a half-built item */
        if (parse_value(p, item, depth + 1))
            return -1;
        skip_ws(p);
        if (p->pos < p->n && p->s[p->pos] == ',') {
            p->pos++;
            continue;
        }
        if (p->pos < p->n && p->s[p->pos] == close) {
            p->pos++;
            return 0;
        }
        return fail(p, obj ? "expected ',' or '}'" : "expected ',' or ']'");
    }
}

static int parse_value(parser *p, jval *v, int depth)
{
    if (depth > MAX_DEPTH)
        return fail(p, "JSON nested too deeply");
    skip_ws(p);
    if (p->pos >= p->n)
        return fail(p, "unexpected end of JSON");
    const char c = p->s[p->pos];
    switch (c) {
    case '{': return parse_container(p, v, depth, 1);
    case '[': return parse_container(p, v, depth, 0);
    case '"': v->type = J_STR; return parse_string(p, &v->str);
    case 't': v->type = J_BOOL; v->boolean = 1; return lit(p, "true");
    case 'f': v->type = J_BOOL; v->boolean = 0; return lit(p, "false");
    case 'n': v->type = J_NULL; return lit(p, "null");
    case 'N': /* Python writes NaN and Infinity */
        v->type = J_NUM; v->num = NAN; return lit(p, "NaN");
    case 'I': v->type = J_NUM; v->num = INFINITY; return lit(p, "Infinity");
    default:
        if (c == '-' && p->pos + 1 < p->n && p->s[p->pos + 1] == 'I') {
            p->pos++;
            v->type = J_NUM;
            v->num = -INFINITY;
            return lit(p, "Infinity");
        }
        return parse_number(p, v);
    }
}

void bhvi_json_free(jval *v)
{
    if (v == NULL)
        return;
    free(v->str);
    for (size_t i = 0; i < v->n; ++i) {
        bhvi_json_free(&v->items[i]);
        if (v->keys)
            free(v->keys[i]);
    }
    free(v->items);
    free(v->keys);
    memset(v, 0, sizeof(*v));
}

int bhvi_json_parse(const char *s, size_t n, jval *out, char *err, size_t errlen)
{
    parser p = {s, n, 0, err, errlen};
    memset(out, 0, sizeof(*out));
    if (parse_value(&p, out, 0)) {
        bhvi_json_free(out);
        return -1;
    }
    skip_ws(&p);
    if (p.pos != n) {
        bhvi_json_free(out);
        return fail(&p, "extra data after the JSON value");
    }
    return 0;
}

const jval *bhvi_json_get(const jval *obj, const char *key)
{
    if (obj == NULL || obj->type != J_OBJ)
        return NULL;
    for (size_t i = obj->n; i-- > 0;)
        if (strcmp(obj->keys[i], key) == 0)
            return &obj->items[i];
    return NULL;
}

/* ------------------------------------------------------------------ canonical dump */

typedef struct {
    char *s;
    size_t n, cap;
    int bad;
} sbuf;

static void put(sbuf *b, const char *s, size_t n)
{
    if (b->bad)
        return;
    if (b->n + n + 1 > b->cap) {
        size_t nc = b->cap ? b->cap : 4096;
        while (b->n + n + 1 > nc)
            nc *= 2;
        char *p = (char *)realloc(b->s, nc);
        if (!p) {
            b->bad = 1;
            return;
        }
        b->s = p;
        b->cap = nc;
    }
    memcpy(b->s + b->n, s, n);
    b->n += n;
    b->s[b->n] = 0;
}

static void puts_(sbuf *b, const char *s) { put(b, s, strlen(s)); }

/* Python's repr of a finite double: the shortest digits that round-trip, in exponent form
 * when the decimal exponent is < -4 or >= 16, else positional with at least one decimal. */
static void put_float(sbuf *b, double x)
{
    char tmp[64];
    if (isnan(x)) {
        puts_(b, "NaN");
        return;
    }
    if (isinf(x)) {
        puts_(b, x > 0 ? "Infinity" : "-Infinity");
        return;
    }
    int p;
    for (p = 1; p <= 17; ++p) {
        snprintf(tmp, sizeof(tmp), "%.*e", p - 1, x);
        if (strtod(tmp, NULL) == x)
            break;
    }
    /* tmp: [-]d[.ddd]e[+-]XX */
    char digits[32];
    int nd = 0, neg = tmp[0] == '-';
    const char *q = tmp + neg;
    for (; *q && *q != 'e'; ++q)
        if (*q >= '0' && *q <= '9')
            digits[nd++] = *q;
    while (nd > 1 && digits[nd - 1] == '0')
        --nd;
    const int e = atoi(q + 1);
    char out[64];
    int k = 0;
    if (neg)
        out[k++] = '-';
    if (e < -4 || e >= 16) {
        out[k++] = digits[0];
        if (nd > 1) {
            out[k++] = '.';
            for (int i = 1; i < nd; ++i)
                out[k++] = digits[i];
        }
        k += snprintf(out + k, sizeof(out) - (size_t)k, "e%c%02d", e < 0 ? '-' : '+', e < 0 ? -e : e);
    } else if (e < 0) {
        out[k++] = '0';
        out[k++] = '.';
        for (int i = 0; i < -e - 1; ++i)
            out[k++] = '0';
        for (int i = 0; i < nd; ++i)
            out[k++] = digits[i];
    } else {
        for (int i = 0; i <= e; ++i)
            out[k++] = i < nd ? digits[i] : '0';
        out[k++] = '.';
        if (nd > e + 1)
            for (int i = e + 1; i < nd; ++i)
                out[k++] = digits[i];
        else
            out[k++] = '0';
    }
    put(b, out, (size_t)k);
}

static void put_u16(sbuf *b, unsigned u)
{
    char t[16];
    snprintf(t, sizeof(t), "\\u%04x", u);
    put(b, t, 6);
}

static void put_string(sbuf *b, const char *s)
{
    const unsigned char *p = (const unsigned char *)s;
    put(b, "\"", 1);
    while (*p) {
        unsigned c = *p;
        if (c < 0x80) {
            p++;
            switch (c) {
            case '"': puts_(b, "\\\""); break;
            case '\\': puts_(b, "\\\\"); break;
            case '\n': puts_(b, "\\n"); break;
            case '\r': puts_(b, "\\r"); break;
            case '\t': puts_(b, "\\t"); break;
            case '\b': puts_(b, "\\b"); break;
            case '\f': puts_(b, "\\f"); break;
            default:
                if (c < 0x20) {
                    put_u16(b, c);
                } else {
                    const char ch = (char)c;
                    put(b, &ch, 1);
                }
            }
            continue;
        }
        int len = c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : c >= 0xC0 ? 2 : 0;
        if (!len) {
            b->bad = 1; /* not UTF-8: Python could not have read it either */
            return;
        }
        unsigned cp = c & (0x7F >> len);
        for (int i = 1; i < len; ++i) {
            if ((p[i] & 0xC0) != 0x80) {
                b->bad = 1;
                return;
            }
            cp = (cp << 6) | (p[i] & 0x3F);
        }
        p += len;
        if (cp >= 0x10000) {
            cp -= 0x10000;
            put_u16(b, 0xD800 + (cp >> 10));
            put_u16(b, 0xDC00 + (cp & 0x3FF));
        } else {
            put_u16(b, cp);
        }
    }
    put(b, "\"", 1);
}

static _Thread_local const jval *sort_obj; /* qsort context (single-threaded use while dumping) */

/* by key, repeated keys in the order they were written (so the last one ends each run) */
static int key_order(const void *a, const void *b)
{
    const size_t i = *(const size_t *)a, j = *(const size_t *)b;
    const int c = strcmp(sort_obj->keys[i], sort_obj->keys[j]);
    return c ? c : (i > j) - (i < j);
}

static void dump(sbuf *b, const jval *v, const char *skip)
{
    char tmp[32];
    switch (v->type) {
    case J_NULL: puts_(b, "null"); break;
    case J_BOOL: puts_(b, v->boolean ? "true" : "false"); break;
    case J_NUM:
        if (v->is_int) {
            snprintf(tmp, sizeof(tmp), "%lld", (long long)v->i);
            puts_(b, tmp);
        } else {
            put_float(b, v->num);
        }
        break;
    case J_STR: put_string(b, v->str); break;
    case J_ARR:
        put(b, "[", 1);
        for (size_t i = 0; i < v->n; ++i) {
            if (i)
                put(b, ",", 1);
            dump(b, &v->items[i], NULL);
        }
        put(b, "]", 1);
        break;
    case J_OBJ: {
        /* the last of repeated keys (as Python's dict), sorted: O(n log n), not a scan of
         * every key against every other */
        size_t *idx = (size_t *)malloc((v->n ? v->n : 1) * sizeof(size_t)), n = 0, m = 0;
        if (!idx) {
            b->bad = 1;
            return;
        }
        for (size_t i = 0; i < v->n; ++i)
            if (!(skip && strcmp(v->keys[i], skip) == 0))
                idx[n++] = i;
        sort_obj = v;
        qsort(idx, n, sizeof(size_t), key_order);
        for (size_t t = 0; t < n; ++t)
            if (t + 1 == n || strcmp(v->keys[idx[t]], v->keys[idx[t + 1]]) != 0)
                idx[m++] = idx[t];
        put(b, "{", 1);
        for (size_t t = 0; t < m; ++t) {
            if (t)
                put(b, ",", 1);
            put_string(b, v->keys[idx[t]]);
            put(b, ":", 1);
            dump(b, &v->items[idx[t]], NULL);
        }
        put(b, "}", 1);
        free(idx);
        break;
    }
    }
}

char *bhvi_json_canonical(const jval *v, const char *skip)
{
    sbuf b = {NULL, 0, 0, 0};
    dump(&b, v, skip);
    if (b.bad) {
        free(b.s);
        return NULL;
    }
    return b.s;
}
