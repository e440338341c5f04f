/*
 * Fuzz harnesses for dsv2.c (make fuzz, make fuzz-smoke; tests/fuzz.sh runs them under AFL++).
 * Each target reads one input file and runs it through the real code. A bad input must end in
 * dsv2's one error line and exit 1; a signal, a sanitizer report or a hang is a finding. The
 * tokenizer a target uses is loaded before __AFL_INIT (AFL++'s deferred fork server), so every
 * run starts with it in memory.
 *
 *   build/fuzz loader FILE        a checkpoint: load, validate, a few forward steps
 *   build/fuzz tokblob FILE       a tokenizer blob (.tok): parse, encode and decode a text
 *   build/fuzz encode TOK FILE    text through a real tokenizer (V2's or V3's), then decoded
 *   build/fuzz decode TOK FILE    token ids (text) through a real tokenizer's decoder
 *   build/fuzz regex TOK FILE     a pre-tokenizer pattern: compile it (with TOK's Unicode
 *                                 tables) and split a mixed text and the pattern itself with it
 */
#define DSV2_NO_MAIN
#include "../dsv2.c"

static const char sample_text[] = "Hello world! 123 4567 ünïcödé 中文字符 ..\n\n  tabs\tand   spaces ';:' \xF0\x9F\x98\x80 end";

static void fuzz_loader(const char *path) {
    Weights w;
    memset(&w, 0, sizeof w);
    load_weights(&w, path, WEIGHTS_MMAP);
    Tokenizer *tok = open_tokenizer(path, &w);
    const Config *c = &w.cfg;
    int context = c->max_position_embeddings < 8 ? c->max_position_embeddings : 8;
    for (int mode = ATTN_ABSORB; mode <= ATTN_NAIVE; mode++) {
        RunState s;
        init_run_state(&s, c, mode, context);
        int ids[8];
        for (int i = 0; i < context; i++) ids[i] = (i * 7 + 1) % c->vocab_size;
        forward_checked(&w, &s, ids, context > 1 ? context - 1 : 1, 0);
        if (context > 1) forward_checked(&w, &s, ids + context - 1, 1, context - 1);
        free_run_state(&s);
    }
    if (tok) close_tokenizer(tok);
    free_weights(&w);
}

/* Encodes text (dies on invalid UTF-8, as the CLI does) and decodes the ids again. */
static void encode_decode(Tokenizer *tok, const char *text, size_t len) {
    IdList ids = {0};
    tokenizer_encode(tok, text, len, 1, &ids);
    TextSink sink = {0};
    for (int i = 0; i < ids.n; i++) decode_token(tok, &sink, ids.ids[i], 0);
    sink_flush(&sink);
    free(sink.buf);
    free(ids.ids);
}

static void fuzz_tokblob(const char *path) {
    Tokenizer *tok = open_tokenizer(path, NULL);
    encode_decode(tok, sample_text, strlen(sample_text));
    close_tokenizer(tok);
}

static void fuzz_encode(Tokenizer *tok, const char *path) {
    size_t len = 0;
    char *text = read_file(path, &len);
    encode_decode(tok, text, len);
    free(text);
}

static void fuzz_decode(Tokenizer *tok, const char *path) {
    char *text = read_file(path, NULL);
    int n = 0, *ids = parse_ids(text, 1 << 30, &n);
    TextSink sink = {0};
    for (int i = 0; i < n; i++) decode_token(tok, &sink, ids[i], i % 2);
    sink_flush(&sink);
    free(sink.buf);
    free(ids);
    free(text);
}

static void fuzz_regex(Tokenizer *tok, const char *path) {
    size_t len = 0;
    char *pattern = read_file(path, &len);
    Regex re, *saved = tok->regex;
    int saved_n = tok->n_regex;
    regex_compile(&re, pattern, len, tok->props, tok->n_props);
    tok->regex = &re;  /* the tokenizer with this one pattern as its pre-tokenizer */
    tok->n_regex = 1;
    for (int k = 0; k < 2; k++) {  /* a mixed text, and the pattern's own characters */
        const char *text = k ? pattern : sample_text;
        size_t n = k ? len : strlen(sample_text);
        uint32_t *cps = xcalloc(n + 1, sizeof(uint32_t)), cp[2];
        int count = 0;
        Utf8Decoder d = {0};
        for (size_t i = 0; i < n; i++)
            for (int j = 0, got = utf8_feed(&d, (uint8_t)text[i], cp); j < got; j++) cps[count++] = cp[j];
        int *pieces;
        pretokenize(tok, cps, count, &pieces);
        free(pieces);
        free(cps);
    }
    tok->regex = saved;
    tok->n_regex = saved_n;
    regex_free(&re);
    free(pattern);
}

int main(int argc, char **argv) {
    int with_tok = argc == 4 && (!strcmp(argv[1], "encode") || !strcmp(argv[1], "decode") || !strcmp(argv[1], "regex"));
    if (!with_tok && !(argc == 3 && (!strcmp(argv[1], "loader") || !strcmp(argv[1], "tokblob")))) {
        fprintf(stderr, "usage: fuzz loader|tokblob FILE | fuzz encode|decode|regex TOK FILE\n");
        return 2;
    }
    Tokenizer *tok = with_tok ? open_tokenizer(argv[2], NULL) : NULL;
    const char *input = argv[argc - 1];
#ifdef __AFL_HAVE_MANUAL_CONTROL
    __AFL_INIT();  /* fork here: each run starts with the tokenizer loaded */
    while (__AFL_LOOP(1000)) {  /* persistent: inputs that load run in one process; an error exits */
#endif
        if (!strcmp(argv[1], "loader")) fuzz_loader(input);
        else if (!strcmp(argv[1], "tokblob")) fuzz_tokblob(input);
        else if (!strcmp(argv[1], "encode")) fuzz_encode(tok, input);
        else if (!strcmp(argv[1], "decode")) fuzz_decode(tok, input);
        else fuzz_regex(tok, input);
#ifdef __AFL_HAVE_MANUAL_CONTROL
    }
#endif
    if (tok) close_tokenizer(tok);
    return 0;
}
