/* json.h -- a small, bounded JSON reader for export manifests and safetensors headers. */
#ifndef BHV_JSON_H
#define BHV_JSON_H

#include <stddef.h>
#include <stdint.h>

typedef enum { J_NULL, J_BOOL, J_NUM, J_STR, J_ARR, J_OBJ } jtype;

typedef struct jval {
    jtype type;
    int boolean;
    double num;
    int is_int;       /* a number literal without fraction or exponent that fits int64 */
    int64_t i;
    char *str;        /* J_STR: NUL-terminated UTF-8 (a string holding NUL is refused) */
    size_t n;         /* J_ARR / J_OBJ: number of items */
    struct jval *items;
    char **keys;      /* J_OBJ: the items' keys */
} jval;

/* Parse n bytes; 0 = ok, else -1 with a message in err.  Nesting deeper than 64 is refused. */
int bhvi_json_parse(const char *s, size_t n, jval *out, char *err, size_t errlen);
void bhvi_json_free(jval *v);
/* The value of key in an object (the last one if repeated, as Python's json), or NULL. */
const jval *bhvi_json_get(const jval *obj, const char *key);

/* The canonical form Python's json.dumps(v, sort_keys=True, separators=(",", ":")) writes
 * (ASCII only, floats as Python's repr), leaving out the top-level key skip (or NULL).
 * Returns a malloc'ed NUL-terminated string, or NULL (out of memory, or a value that form
 * cannot hold). */
char *bhvi_json_canonical(const jval *v, const char *skip);

#endif
