/* json.c -- see json.h.  Recursive descent over a length-bounded buffer. */
#include "json.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

#define MAX_DEPTH 64

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
                if (lo >= 0xDC00 && lo < 0xE000)
                    cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                else
                    cp = 0xFFFD;
            } else if (cp >= 0xD800 && cp < 0xE000) {
                cp = 0xFFFD;
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

static int parse_number(parser *p, jval *v)
{
    const size_t start = p->pos;
    int is_int = 1;
    if (p->pos < p->n && p->s[p->pos] == '-')
        p->pos++;
    if (p->pos >= p->n || p->s[p->pos] < '0' || p->s[p->pos] > '9')
        return fail(p, "bad number");
    while (p->pos < p->n && ((p->s[p->pos] >= '0' && p->s[p->pos] <= '9') || p->s[p->pos] == '.' ||
                             p->s[p->pos] == 'e' || p->s[p->pos] == 'E' || p->s[p->pos] == '+' ||
                             p->s[p->pos] == '-')) {
        if (p->s[p->pos] == '.' || p->s[p->pos] == 'e' || p->s[p->pos] == 'E')
            is_int = 0;
        p->pos++;
    }
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
        if (errno == 0 && *endp == 0) {
            v->is_int = 1;
            v->i = (int64_t)ll;
        }
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
        v->n++; /* counted before parsing, so that json_free frees a half-built item */
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

void json_free(jval *v)
{
    if (v == NULL)
        return;
    free(v->str);
    for (size_t i = 0; i < v->n; ++i) {
        json_free(&v->items[i]);
        if (v->keys)
            free(v->keys[i]);
    }
    free(v->items);
    free(v->keys);
    memset(v, 0, sizeof(*v));
}

int json_parse(const char *s, size_t n, jval *out, char *err, size_t errlen)
{
    parser p = {s, n, 0, err, errlen};
    memset(out, 0, sizeof(*out));
    if (parse_value(&p, out, 0)) {
        json_free(out);
        return -1;
    }
    skip_ws(&p);
    if (p.pos != n) {
        json_free(out);
        return fail(&p, "extra data after the JSON value");
    }
    return 0;
}

const jval *json_get(const jval *obj, const char *key)
{
    if (obj == NULL || obj->type != J_OBJ)
        return NULL;
    for (size_t i = obj->n; i-- > 0;)
        if (strcmp(obj->keys[i], key) == 0)
            return &obj->items[i];
    return NULL;
}
