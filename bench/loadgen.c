/*
 * tidings load generator: an epoll WebSocket client that can outrun a Python server.
 *
 * Plain C, libc only. Build:  cc -O2 -o bench/build/loadgen bench/loadgen.c
 * (bench/build.sh does this). Run `loadgen --help` for the flags.
 *
 * Modes
 *   (default)     subscribe mode: open N connections, upgrade on --path (default /ws), send one
 *                 subscribe command per connection (channel = --channel-fmt with i % --channels),
 *                 wait for all replies, then count "message" pushes and their latency.
 *   --recover     connect storm: like subscribe mode with "since" set; every connection expects
 *                 --expect replayed messages; reports time until all connections are done.
 *   --idle        hold N upgraded connections open for --duration seconds, no subscribe.
 *   --echo        round trips on /websocket ("You said: <text>"), one in flight per connection.
 *   --chatsocket  the original Tornado demo protocol on /chatsocket: count {"id","body","html"}
 *                 frames; latency from "t=<unix ns>" inside body.
 *
 * Latency: the publisher puts {"t": <unix ns>} in the publication data; the loadgen scans for
 * "t": in the payload and records CLOCK_REALTIME(now at read) - t in a log-linear histogram
 * (64 sub-buckets per power of two, <1.6% error), same machine so the clocks agree.
 *
 * Stops by itself: --duration (hard cap, default 30 s), --quiet (no message for S seconds after
 * the first one), all connections done (--expect reached) or all closed; SIGINT/SIGTERM/SIGUSR1
 * stop it gracefully. Prints "READY {...}" on stderr once every connection is established
 * (and subscribed), and exactly one JSON line on stdout at the end.
 *
 * Only loopback (127.0.0.0/8) targets and source addresses are accepted.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#ifndef IP_BIND_ADDRESS_NO_PORT
#define IP_BIND_ADDRESS_NO_PORT 24
#endif

enum { M_SUB, M_RECOVER, M_IDLE, M_ECHO, M_CHAT };
enum { S_NEW, S_CONNECTING, S_HANDSHAKE, S_SUBSCRIBING, S_READY, S_CLOSED };

#define MAX_FRAME (64u * 1024u * 1024u)
#define RCHUNK (256u * 1024u)
#define HIST_SUB 64
#define HIST_N (2 * HIST_SUB + 58 * HIST_SUB)
#define PERSEC_N 600

typedef struct conn {
    int fd;
    uint8_t state;
    uint8_t done;
    uint8_t sent_close;
    uint8_t frag_op;
    uint32_t idx;
    uint32_t nrecv;
    uint32_t echo_seq;
    int64_t last_off; /* last offset seen on this connection's subscription, -1 unknown */
    int64_t echo_sent_ns;
    uint8_t *pend; /* incoming bytes not yet parsed (partial frame or partial headers) */
    uint32_t pend_len, pend_cap;
    uint8_t *out; /* outgoing bytes the socket did not take yet */
    uint32_t out_len, out_cap;
    uint8_t *frag; /* fragmented message being reassembled */
    uint32_t frag_len, frag_cap;
} conn;

/* ---------- configuration ---------- */
static int mode = M_SUB;
static const char *host = "127.0.0.1";
static int port = 8888;
static const char *path = NULL;
static int nconns = 100;
static int conn_offset = 0;
static int nsrc = 1;
static int src_base = 1;
static int nchannels = 1;
static const char *channel_fmt = "bench:c%d";
static long long since_offset = -1;
static const char *since_epoch = NULL;
static long long expect = 0;
static double duration = 30.0;
static double quiet = 3.0;
static double ready_timeout = 60.0;
static int max_pending = 0;
static int echo_rounds = 0;
static int echo_size = 32;
static int want_hist = 0;
static int per_offset = 0; /* --per-offset: max latency per publication offset */
static const char *origin = NULL;
static const char *token = NULL;

/* ---------- state ---------- */
static conn *conns;
static int ep;
static volatile sig_atomic_t stop_flag = 0;
static int next_idx = 0, n_pending = 0, n_open = 0, n_established = 0, n_subscribed = 0;
static int n_settled = 0; /* ready or failed before ready */
static int n_done = 0, n_closed_after_ready = 0, n_recovered_false = 0, n_recovered_true = 0;
static int ready_printed = 0;
static int64_t start_ns, ready_ns, first_ns, last_ns, all_done_ns, stop_ns;
static uint64_t received = 0, received_before_ready = 0, other_frames = 0;
static uint64_t dups = 0, gaps = 0, gap_msgs = 0, disconnect_pushes = 0, pongs_sent = 0;
static uint64_t bytes_in = 0, reads = 0, echo_rtts = 0;
static uint64_t hist[HIST_N], hist_count = 0;
static int64_t lat_max_us = 0;
static uint64_t done_hist[HIST_N], done_count = 0;
static int64_t done_max_us = 0;
#define PER_OFF_N 4096 /* offsets 1..PER_OFF_N-1 tracked by --per-offset; later ones counted as beyond */
static int64_t off_max_us[PER_OFF_N];
static uint32_t off_count[PER_OFF_N];
static uint64_t off_beyond = 0;
static uint64_t persec[PERSEC_N];
static uint8_t *rbuf;
static size_t rbuf_cap;
static uint64_t rng = 0x9E3779B97F4A7C15ull;

#define MAX_KINDS 48
static char kind_name[MAX_KINDS][48];
static uint64_t kind_count[MAX_KINDS];
static int n_kinds = 0;
static uint64_t errors = 0;
static int close_code_v[64];
static uint64_t close_code_n[64];
static int n_close_codes = 0;

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000000000ll + ts.tv_nsec;
}

static void error_kind(const char *name) {
    errors++;
    for (int i = 0; i < n_kinds; i++)
        if (strcmp(kind_name[i], name) == 0) {
            kind_count[i]++;
            return;
        }
    if (n_kinds < MAX_KINDS) {
        snprintf(kind_name[n_kinds], sizeof kind_name[0], "%s", name);
        kind_count[n_kinds++] = 1;
    }
}

static void close_code_seen(int code) {
    for (int i = 0; i < n_close_codes; i++)
        if (close_code_v[i] == code) {
            close_code_n[i]++;
            return;
        }
    if (n_close_codes < 64) {
        close_code_v[n_close_codes] = code;
        close_code_n[n_close_codes++] = 1;
    }
}

/* ---------- histogram (values in microseconds) ---------- */
static int hist_index(int64_t v) {
    if (v < 0) v = 0;
    if (v < 2 * HIST_SUB) return (int)v;
    int msb = 63 - __builtin_clzll((unsigned long long)v); /* >= 7 */
    int shift = msb - 6;
    int idx = 2 * HIST_SUB + (msb - 7) * HIST_SUB + (int)((v >> shift) - HIST_SUB);
    return idx < HIST_N ? idx : HIST_N - 1;
}

static double hist_value(int idx) { /* bucket midpoint */
    if (idx < 2 * HIST_SUB) return idx;
    int msb = (idx - 2 * HIST_SUB) / HIST_SUB + 7;
    int sub = (idx - 2 * HIST_SUB) % HIST_SUB + HIST_SUB;
    int shift = msb - 6;
    double lo = (double)((int64_t)sub << shift);
    return lo + (double)((int64_t)1 << shift) / 2.0;
}

static double hist_pct(const uint64_t *h, uint64_t count, double p) {
    if (count == 0) return 0;
    uint64_t rank = (uint64_t)(p * (double)count);
    if (rank < 1) rank = 1;
    if (rank > count) rank = count;
    uint64_t acc = 0;
    int i;
    for (i = 0; i < HIST_N; i++) {
        acc += h[i];
        if (acc >= rank) break;
    }
    return hist_value(i < HIST_N ? i : HIST_N - 1);
}

static double pct_clamped(const uint64_t *h, uint64_t count, double p, int64_t max_us) {
    double v = hist_pct(h, count, p);
    return v > (double)max_us ? (double)max_us : v;
}

/* ---------- small helpers ---------- */
static uint32_t rnd32(void) {
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (uint32_t)rng;
}

static void ensure(uint8_t **buf, uint32_t *cap, size_t need) {
    if (*cap >= need) return;
    size_t c = *cap ? *cap : 256;
    while (c < need) c *= 2;
    uint8_t *p = realloc(*buf, c);
    if (!p) {
        fprintf(stderr, "out of memory\n");
        exit(2);
    }
    *buf = p;
    *cap = (uint32_t)c;
}

/* Find `"key"` followed by optional spaces and ':'; return pointer after the colon+spaces. */
static const uint8_t *find_key(const uint8_t *p, size_t n, const char *qkey, size_t klen) {
    const uint8_t *end = p + n;
    while (p < end) {
        const uint8_t *q = memmem(p, (size_t)(end - p), qkey, klen);
        if (!q) return NULL;
        const uint8_t *r = q + klen;
        while (r < end && (*r == ' ' || *r == '\t')) r++;
        if (r < end && *r == ':') {
            r++;
            while (r < end && (*r == ' ' || *r == '\t')) r++;
            return r;
        }
        p = q + 1;
    }
    return NULL;
}

/* Parse an integer (optionally a decimal number) at p. Returns 1 on success. */
static int parse_num(const uint8_t *p, const uint8_t *end, int64_t *iv, double *dv, int *is_float) {
    int neg = 0;
    if (p < end && *p == '-') {
        neg = 1;
        p++;
    }
    if (p >= end || *p < '0' || *p > '9') return 0;
    int64_t v = 0;
    while (p < end && *p >= '0' && *p <= '9') v = v * 10 + (*p++ - '0');
    *is_float = 0;
    double d = (double)v;
    if (p < end && (*p == '.' || *p == 'e' || *p == 'E')) {
        char tmp[64];
        const uint8_t *s = p;
        while (s < end && (size_t)(s - p) < 40 && ((*s >= '0' && *s <= '9') || *s == '.' || *s == 'e' ||
                                                    *s == 'E' || *s == '-' || *s == '+'))
            s++;
        int l = snprintf(tmp, sizeof tmp, "%lld", (long long)v);
        memcpy(tmp + l, p, (size_t)(s - p));
        tmp[l + (s - p)] = 0;
        d = strtod(tmp, NULL);
        *is_float = 1;
    }
    *iv = neg ? -v : v;
    *dv = neg ? -d : d;
    return 1;
}

/* A timestamp to unix ns, guessing the unit from its magnitude (s, ms, us or ns). */
static int64_t to_ns(int64_t iv, double dv, int is_float) {
    double a = is_float ? dv : (double)iv;
    if (a > 1e17) return is_float ? (int64_t)dv : iv;
    if (a > 1e14) return (int64_t)(a * 1e3);
    if (a > 1e11) return (int64_t)(a * 1e6);
    return (int64_t)(a * 1e9);
}

/* ---------- output ---------- */
static void conn_flush(conn *c);

static void conn_queue(conn *c, const uint8_t *data, size_t n) {
    if (c->state == S_CLOSED || c->fd < 0) return;
    if (c->out_len == 0) {
        ssize_t w = send(c->fd, data, n, MSG_NOSIGNAL);
        if (w == (ssize_t)n) return;
        if (w < 0) {
            if (errno != EAGAIN && errno != EWOULDBLOCK) {
                error_kind("write");
                return;
            }
            w = 0;
        }
        data += w;
        n -= (size_t)w;
        ensure(&c->out, &c->out_cap, n);
        memcpy(c->out, data, n);
        c->out_len = (uint32_t)n;
        struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT, .data.ptr = c};
        epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
        return;
    }
    ensure(&c->out, &c->out_cap, c->out_len + n);
    memcpy(c->out + c->out_len, data, n);
    c->out_len += (uint32_t)n;
}

static void conn_flush(conn *c) {
    if (c->out_len == 0) return;
    ssize_t w = send(c->fd, c->out, c->out_len, MSG_NOSIGNAL);
    if (w < 0) {
        if (errno != EAGAIN && errno != EWOULDBLOCK) {
            error_kind("write");
            c->out_len = 0;
        }
        return;
    }
    memmove(c->out, c->out + w, c->out_len - (size_t)w);
    c->out_len -= (uint32_t)w;
    if (c->out_len == 0) {
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
        epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
    }
}

/* Build one masked client frame. */
static void send_frame(conn *c, int op, const uint8_t *payload, size_t n) {
    uint8_t stackbuf[4096];
    uint8_t *f = n + 14 <= sizeof stackbuf ? stackbuf : malloc(n + 14);
    size_t h = 0;
    f[h++] = (uint8_t)(0x80 | op);
    if (n < 126) {
        f[h++] = (uint8_t)(0x80 | n);
    } else if (n < 65536) {
        f[h++] = 0x80 | 126;
        f[h++] = (uint8_t)(n >> 8);
        f[h++] = (uint8_t)n;
    } else {
        f[h++] = 0x80 | 127;
        for (int i = 7; i >= 0; i--) f[h++] = (uint8_t)((uint64_t)n >> (8 * i));
    }
    uint32_t m = rnd32();
    uint8_t mk[4] = {(uint8_t)m, (uint8_t)(m >> 8), (uint8_t)(m >> 16), (uint8_t)(m >> 24)};
    memcpy(f + h, mk, 4);
    h += 4;
    for (size_t i = 0; i < n; i++) f[h + i] = payload[i] ^ mk[i & 3];
    conn_queue(c, f, h + n);
    if (f != stackbuf) free(f);
}

static void send_text(conn *c, const char *s, size_t n) { send_frame(c, 0x1, (const uint8_t *)s, n); }

/* ---------- connection lifecycle ---------- */
static void maybe_ready(void);

static void conn_close(conn *c, const char *why) {
    if (c->state == S_CLOSED) return;
    int was = c->state;
    if (why) error_kind(why);
    if (c->fd >= 0) {
        epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
        close(c->fd);
    }
    c->fd = -1;
    if (was == S_CONNECTING || was == S_HANDSHAKE) n_pending--;
    if (was != S_NEW && was != S_CONNECTING) n_open--;
    if (was == S_READY) {
        n_closed_after_ready++;
    } else {
        n_settled++; /* failed before it became ready */
    }
    c->state = S_CLOSED;
    free(c->pend);
    free(c->out);
    free(c->frag);
    c->pend = c->out = c->frag = NULL;
    c->pend_len = c->pend_cap = c->out_len = c->out_cap = c->frag_len = c->frag_cap = 0;
    maybe_ready();
}

static void conn_start(conn *c) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        c->state = S_CONNECTING;
        n_pending++;
        conn_close(c, errno == EMFILE || errno == ENFILE ? "socket:emfile" : "socket");
        return;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct sockaddr_in src = {.sin_family = AF_INET};
    if (nsrc > 1 || src_base != 1) {
        setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
        uint32_t a = (127u << 24) | (uint32_t)(src_base + (int)(c->idx % (uint32_t)nsrc));
        src.sin_addr.s_addr = htonl(a);
        if (bind(fd, (struct sockaddr *)&src, sizeof src) < 0) {
            close(fd);
            c->state = S_CONNECTING;
            n_pending++;
            conn_close(c, "bind");
            return;
        }
    }
    struct sockaddr_in dst = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    inet_pton(AF_INET, host, &dst.sin_addr);
    c->fd = fd;
    c->state = S_CONNECTING;
    n_pending++;
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT, .data.ptr = c};
    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
    if (connect(fd, (struct sockaddr *)&dst, sizeof dst) < 0 && errno != EINPROGRESS) {
        char k[48];
        snprintf(k, sizeof k, "connect:%s", errno == EADDRNOTAVAIL ? "eaddrnotavail" : "errno");
        conn_close(c, k);
    }
}

static void start_more(void) {
    while (next_idx < nconns && (max_pending <= 0 || n_pending < max_pending) && !stop_flag) {
        conn *c = &conns[next_idx++];
        conn_start(c);
    }
}

static void maybe_ready(void) {
    if (ready_printed || n_settled < nconns) return;
    ready_printed = 1;
    ready_ns = now_ns();
    fprintf(stderr, "READY {\"connections\":%d,\"subscribed\":%d,\"ms\":%.1f}\n", n_established, n_subscribed,
            (double)(ready_ns - start_ns) / 1e6);
    fflush(stderr);
}

static void became_ready(conn *c) {
    c->state = S_READY;
    n_settled++;
    maybe_ready();
}

static void send_echo(conn *c) {
    char msg[4096];
    int n = snprintf(msg, sizeof msg, "hello %u t=%lld ", c->echo_seq, (long long)now_ns());
    int target = echo_size < (int)sizeof msg - 1 ? echo_size : (int)sizeof msg - 1;
    while (n < target) msg[n++] = 'x';
    c->echo_sent_ns = now_ns();
    send_text(c, msg, (size_t)n);
}

static void on_open(conn *c) {
    n_pending--;
    n_established++;
    if (mode == M_SUB || mode == M_RECOVER) {
        char ch[300], cmd[800];
        snprintf(ch, sizeof ch, channel_fmt, (conn_offset + (int)c->idx) % nchannels);
        int n;
        if (since_offset >= 0)
            n = snprintf(cmd, sizeof cmd,
                         "{\"id\":1,\"op\":\"subscribe\",\"channel\":\"%s\",\"since\":{\"offset\":%lld,"
                         "\"epoch\":\"%s\"}}",
                         ch, since_offset, since_epoch ? since_epoch : "");
        else
            n = snprintf(cmd, sizeof cmd, "{\"id\":1,\"op\":\"subscribe\",\"channel\":\"%s\"}", ch);
        if (token) {
            char c0[1200];
            int m = snprintf(c0, sizeof c0, "{\"id\":0,\"op\":\"connect\",\"token\":\"%s\"}", token);
            send_text(c, c0, (size_t)m);
        }
        c->state = S_SUBSCRIBING;
        send_text(c, cmd, (size_t)n);
    } else if (mode == M_ECHO) {
        became_ready(c);
        send_echo(c);
    } else {
        became_ready(c);
    }
}

/* ---------- message handling ---------- */
static void conn_finished(conn *c, int64_t t) {
    c->done = 1;
    n_done++;
    int64_t us = (t - start_ns) / 1000;
    done_hist[hist_index(us)]++;
    done_count++;
    if (us > done_max_us) done_max_us = us;
    if (expect > 0 && n_done >= n_subscribed && ready_printed) all_done_ns = t;
}

static void record_latency(int64_t lat_ns) {
    int64_t us = lat_ns / 1000;
    if (us < 0) us = 0;
    hist[hist_index(us)]++;
    hist_count++;
    if (us > lat_max_us) lat_max_us = us;
}

static void count_delivery(conn *c, int64_t t) {
    if (!ready_printed) {
        received_before_ready++;
    }
    received++;
    if (!first_ns) first_ns = t;
    last_ns = t;
    if (ready_printed) {
        int64_t s = (t - ready_ns) / 1000000000ll;
        if (s >= 0 && s < PERSEC_N) persec[s]++;
    }
    c->nrecv++;
    if (expect > 0 && !c->done && c->nrecv >= expect) conn_finished(c, t);
}

static void handle_sub_reply(conn *c, const uint8_t *p, size_t n) {
    const uint8_t *end = p + n;
    const uint8_t *ok = find_key(p, n, "\"ok\"", 4);
    if (!ok) {
        other_frames++;
        return;
    }
    const uint8_t *idv = find_key(p, n, "\"id\"", 4);
    if (idv && *idv == '0') { /* reply to connect */
        if (*ok != 't') {
            error_kind("connect_refused");
        }
        return;
    }
    if (c->state != S_SUBSCRIBING) {
        other_frames++;
        return;
    }
    if (*ok == 't') {
        const uint8_t *off = find_key(p, n, "\"offset\"", 8);
        int64_t iv = 0;
        double dv;
        int fl;
        if (off && parse_num(off, end, &iv, &dv, &fl)) {
            /* with since and recovered=true, replay starts after since.offset */
            const uint8_t *rec = find_key(p, n, "\"recovered\"", 11);
            if (rec && *rec == 't') {
                n_recovered_true++;
                if (c->last_off < 0) c->last_off = since_offset;
            } else {
                if (rec) n_recovered_false++;
                if (c->last_off < 0) c->last_off = iv;
            }
        }
        n_subscribed++;
        became_ready(c);
    } else {
        char k[48] = "subscribe:";
        const uint8_t *code = find_key(p, n, "\"code\"", 6);
        if (code && *code == '"') {
            size_t l = 10;
            code++;
            while (code < end && *code != '"' && l < sizeof k - 1) k[l++] = (char)*code++;
            k[l] = 0;
        }
        error_kind(k);
        c->state = S_READY; /* count as settled but not subscribed */
        n_settled++;
        c->done = 1;
        maybe_ready();
    }
}

static void handle_message(conn *c, const uint8_t *p, size_t n, int64_t t) {
    const uint8_t *end = p + n;
    if (mode == M_ECHO) {
        if (n >= 10 && memcmp(p, "You said: ", 10) == 0) {
            record_latency(t - c->echo_sent_ns);
            echo_rtts++;
            count_delivery(c, t);
            c->echo_seq++;
            if ((echo_rounds <= 0 || (int)c->echo_seq < echo_rounds) && !stop_flag) {
                send_echo(c);
            } else if (!c->done) {
                conn_finished(c, t);
            }
        } else {
            other_frames++;
        }
        return;
    }
    if (mode == M_CHAT) {
        count_delivery(c, t);
        const uint8_t *b = find_key(p, n, "\"body\"", 6);
        if (b) {
            const uint8_t *q = memmem(b, (size_t)(end - b), "t=", 2);
            int64_t iv;
            double dv;
            int fl;
            if (q && parse_num(q + 2, end, &iv, &dv, &fl)) record_latency(t - to_ns(iv, dv, fl));
        }
        return;
    }
    if (mode == M_IDLE) {
        other_frames++;
        return;
    }
    /* subscribe / recover: push or reply? */
    const uint8_t *ty = NULL;
    if (n > 17 && memcmp(p, "{\"type\":\"message\"", 17) == 0)
        ty = p + 8;
    else
        ty = find_key(p, n, "\"type\"", 6);
    if (!ty) {
        handle_sub_reply(c, p, n);
        return;
    }
    if ((size_t)(end - ty) >= 9 && memcmp(ty, "\"message\"", 9) == 0) {
        count_delivery(c, t);
        const uint8_t *off = find_key(p, n, "\"offset\"", 8);
        int64_t iv;
        double dv;
        int fl;
        int64_t off_v = -1;
        if (off && parse_num(off, end, &iv, &dv, &fl)) {
            off_v = iv;
            if (c->last_off >= 0) {
                if (iv <= c->last_off)
                    dups++;
                else if (iv > c->last_off + 1) {
                    gaps++;
                    gap_msgs += (uint64_t)(iv - c->last_off - 1);
                }
            }
            if (iv > c->last_off) c->last_off = iv;
        }
        if (mode == M_SUB) {
            const uint8_t *d = find_key(p, n, "\"data\"", 6);
            const uint8_t *tv = d ? find_key(d, (size_t)(end - d), "\"t\"", 3) : NULL;
            if (tv && parse_num(tv, end, &iv, &dv, &fl)) {
                int64_t lat = t - to_ns(iv, dv, fl);
                record_latency(lat);
                if (per_offset && off_v >= 0) {
                    if (off_v < PER_OFF_N) {
                        int64_t us = lat / 1000;
                        if (us < 0) us = 0;
                        if (!off_count[off_v] || us > off_max_us[off_v]) off_max_us[off_v] = us;
                        off_count[off_v]++;
                    } else {
                        off_beyond++;
                    }
                }
            }
        }
    } else if ((size_t)(end - ty) >= 12 && memcmp(ty, "\"disconnect\"", 12) == 0) {
        disconnect_pushes++;
        const uint8_t *code = find_key(p, n, "\"code\"", 6);
        int64_t iv;
        double dv;
        int fl;
        char k[48];
        if (code && parse_num(code, end, &iv, &dv, &fl))
            snprintf(k, sizeof k, "disconnect:%lld", (long long)iv);
        else
            snprintf(k, sizeof k, "disconnect");
        error_kind(k);
    } else {
        other_frames++;
    }
}

/* Returns 0 if the connection was closed. */
static int handle_frame(conn *c, int op, int fin, const uint8_t *p, size_t n, int64_t t) {
    switch (op) {
    case 0x9: /* ping */
        send_frame(c, 0xA, p, n);
        pongs_sent++;
        return 1;
    case 0xA:
        return 1;
    case 0x8: {
        int code = n >= 2 ? (p[0] << 8 | p[1]) : 1005;
        close_code_seen(code);
        if (!c->sent_close) {
            uint8_t b[2] = {(uint8_t)(code >> 8), (uint8_t)code};
            send_frame(c, 0x8, b, code == 1005 ? 0 : 2);
            c->sent_close = 1;
        }
        int normal = stop_flag || code == 1000;
        char k[48];
        snprintf(k, sizeof k, "closed:%d", code);
        conn_close(c, normal ? NULL : k);
        return 0;
    }
    case 0x1:
    case 0x2:
        if (fin) {
            handle_message(c, p, n, t);
            return c->state != S_CLOSED;
        }
        c->frag_op = (uint8_t)op;
        c->frag_len = 0;
        /* fallthrough */
    case 0x0:
        ensure(&c->frag, &c->frag_cap, c->frag_len + n);
        memcpy(c->frag + c->frag_len, p, n);
        c->frag_len += (uint32_t)n;
        if (op == 0x0 && fin) {
            handle_message(c, c->frag, c->frag_len, t);
            if (c->state != S_CLOSED) c->frag_len = 0;
            return c->state != S_CLOSED;
        }
        return 1;
    default:
        conn_close(c, "bad_opcode");
        return 0;
    }
}

/* Parse as many complete frames as buf holds; returns bytes consumed or -1 if closed. */
static long parse_frames(conn *c, uint8_t *buf, size_t len, int64_t t) {
    size_t pos = 0;
    while (len - pos >= 2) {
        uint8_t *f = buf + pos;
        int fin = f[0] & 0x80, op = f[0] & 0x0F, masked = f[1] & 0x80;
        uint64_t plen = f[1] & 0x7F;
        size_t h = 2;
        if (plen == 126) {
            if (len - pos < 4) break;
            plen = (uint64_t)f[2] << 8 | f[3];
            h = 4;
        } else if (plen == 127) {
            if (len - pos < 10) break;
            plen = 0;
            for (int i = 0; i < 8; i++) plen = plen << 8 | f[2 + i];
            h = 10;
        }
        if (plen > MAX_FRAME) {
            conn_close(c, "frame_too_big");
            return -1;
        }
        uint8_t mk[4] = {0};
        if (masked) {
            if (len - pos < h + 4) break;
            memcpy(mk, f + h, 4);
            h += 4;
        }
        if (len - pos < h + plen) break;
        uint8_t *p = f + h;
        if (masked) {
            error_kind("masked_server_frame");
            for (uint64_t i = 0; i < plen; i++) p[i] ^= mk[i & 3];
        }
        pos += h + plen;
        if (!handle_frame(c, op, fin, p, (size_t)plen, t)) return -1;
    }
    return (long)pos;
}

static void on_handshake_bytes(conn *c, uint8_t *buf, size_t len, int64_t t) {
    uint8_t *e = memmem(buf, len, "\r\n\r\n", 4);
    if (!e) {
        if (len > 16384) {
            conn_close(c, "handshake_too_long");
            return;
        }
        ensure(&c->pend, &c->pend_cap, len);
        memcpy(c->pend, buf, len);
        c->pend_len = (uint32_t)len;
        return;
    }
    if (len < 12 || memcmp(buf + 9, "101", 3) != 0) {
        char k[48];
        snprintf(k, sizeof k, "upgrade:%.3s", len >= 12 ? (const char *)buf + 9 : "???");
        conn_close(c, k);
        return;
    }
    size_t hl = (size_t)(e - buf) + 4;
    on_open(c);
    if (c->state == S_CLOSED) return;
    long used = parse_frames(c, buf + hl, len - hl, t);
    if (used < 0) return;
    size_t rest = len - hl - (size_t)used;
    c->pend_len = 0;
    if (rest) {
        ensure(&c->pend, &c->pend_cap, rest);
        memcpy(c->pend, buf + hl + used, rest);
        c->pend_len = (uint32_t)rest;
    }
}

static void send_upgrade(conn *c) {
    char req[2048];
    int n = snprintf(req, sizeof req,
                     "GET %s HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n",
                     path, host, port);
    if (origin) n += snprintf(req + n, sizeof req - (size_t)n, "Origin: %s\r\n", origin);
    n += snprintf(req + n, sizeof req - (size_t)n, "\r\n");
    c->state = S_HANDSHAKE;
    n_open++;
    conn_queue(c, (const uint8_t *)req, (size_t)n);
}

static void on_event(conn *c, uint32_t events) {
    if (c->state == S_CLOSED) return;
    if (c->state == S_CONNECTING) {
        if (events & (EPOLLOUT | EPOLLERR | EPOLLHUP)) {
            int err = 0;
            socklen_t el = sizeof err;
            getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &el);
            if (err) {
                char k[48];
                snprintf(k, sizeof k, "connect:%s",
                         err == ECONNREFUSED ? "refused" : err == ETIMEDOUT ? "timeout" : "error");
                conn_close(c, k);
                return;
            }
            struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
            epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
            send_upgrade(c);
        }
        return;
    }
    if (events & EPOLLOUT) conn_flush(c);
    if (!(events & (EPOLLIN | EPOLLERR | EPOLLHUP))) return;
    size_t need = (size_t)c->pend_len + RCHUNK;
    if (rbuf_cap < need) {
        rbuf = realloc(rbuf, need);
        rbuf_cap = need;
    }
    if (c->pend_len) memcpy(rbuf, c->pend, c->pend_len);
    ssize_t r = recv(c->fd, rbuf + c->pend_len, RCHUNK, 0);
    if (r == 0) {
        if (c->state == S_READY) close_code_seen(1006);
        conn_close(c, stop_flag ? NULL : "eof");
        return;
    }
    if (r < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) return;
        conn_close(c, errno == ECONNRESET ? "reset" : "read");
        return;
    }
    int64_t t = now_ns();
    reads++;
    bytes_in += (uint64_t)r;
    size_t len = c->pend_len + (size_t)r;
    if (c->state == S_HANDSHAKE) {
        c->pend_len = 0;
        on_handshake_bytes(c, rbuf, len, t);
        return;
    }
    long used = parse_frames(c, rbuf, len, t);
    if (used < 0) return;
    size_t rest = len - (size_t)used;
    if (rest) {
        ensure(&c->pend, &c->pend_cap, rest);
        memmove(c->pend, rbuf + used, rest);
    }
    c->pend_len = (uint32_t)rest;
    if (!rest && c->pend_cap > 65536) { /* give big buffers back */
        free(c->pend);
        c->pend = NULL;
        c->pend_cap = 0;
    }
}

/* ---------- JSON report ---------- */
static void print_report(void) {
    int64_t end = stop_ns ? stop_ns : now_ns();
    double win = (first_ns && last_ns > first_ns) ? (double)(last_ns - first_ns) / 1e9 : 0.0;
    const char *mname[] = {"subscribe", "recover", "idle", "echo", "chatsocket"};
    long long expected = expect > 0 ? (long long)expect * (mode == M_ECHO ? n_established : n_subscribed) : 0;
    long long loss = 0;
    if (expected > 0) {
        long long uniq = (long long)received - (long long)dups;
        loss = expected > uniq ? expected - uniq : 0;
    }
    printf("{\"mode\":\"%s\",\"path\":\"%s\",\"connections\":%d,\"established\":%d,\"subscribed\":%d,", mname[mode],
           path, nconns, n_established, n_subscribed);
    printf("\"open_at_end\":%d,\"received\":%llu,\"received_before_ready\":%llu,\"rate\":%.1f,\"window_s\":%.3f,",
           n_open, (unsigned long long)received, (unsigned long long)received_before_ready,
           win > 0 ? (double)received / win : 0.0, win);
    printf("\"expected\":%lld,\"loss\":%lld,\"dups\":%llu,\"gaps\":%llu,\"gap_msgs\":%llu,", expected, loss,
           (unsigned long long)dups, (unsigned long long)gaps, (unsigned long long)gap_msgs);
    printf("\"latency_ms\":{\"count\":%llu,\"p50\":%.3f,\"p90\":%.3f,\"p99\":%.3f,\"max\":%.3f},",
           (unsigned long long)hist_count, pct_clamped(hist, hist_count, 0.50, lat_max_us) / 1e3,
           pct_clamped(hist, hist_count, 0.90, lat_max_us) / 1e3, pct_clamped(hist, hist_count, 0.99, lat_max_us) / 1e3,
           (double)lat_max_us / 1e3);
    printf("\"ready_ms\":%.1f,", ready_ns ? (double)(ready_ns - start_ns) / 1e6 : -1.0);
    printf("\"done\":%d,\"all_done_ms\":%.1f,\"done_ms\":{\"p50\":%.1f,\"p99\":%.1f,\"max\":%.1f},", n_done,
           all_done_ns ? (double)(all_done_ns - start_ns) / 1e6 : -1.0, pct_clamped(done_hist, done_count, 0.5, done_max_us) / 1e3,
           pct_clamped(done_hist, done_count, 0.99, done_max_us) / 1e3, (double)done_max_us / 1e3);
    printf("\"recovered_true\":%d,\"recovered_false\":%d,\"echo_round_trips\":%llu,", n_recovered_true,
           n_recovered_false, (unsigned long long)echo_rtts);
    printf("\"errors\":%llu,\"error_kinds\":{", (unsigned long long)errors);
    for (int i = 0; i < n_kinds; i++)
        printf("%s\"%s\":%llu", i ? "," : "", kind_name[i], (unsigned long long)kind_count[i]);
    printf("},\"close_codes\":{");
    for (int i = 0; i < n_close_codes; i++)
        printf("%s\"%d\":%llu", i ? "," : "", close_code_v[i], (unsigned long long)close_code_n[i]);
    printf("},\"closed_after_ready\":%d,\"disconnect_pushes\":%llu,\"other_frames\":%llu,\"pongs_sent\":%llu,",
           n_closed_after_ready, (unsigned long long)disconnect_pushes, (unsigned long long)other_frames,
           (unsigned long long)pongs_sent);
    printf("\"reads\":%llu,\"bytes_in\":%llu,", (unsigned long long)reads, (unsigned long long)bytes_in);
    printf("\"start_ns\":%lld,\"ready_ns\":%lld,\"first_ns\":%lld,\"last_ns\":%lld,\"end_ns\":%lld,",
           (long long)start_ns, (long long)ready_ns, (long long)first_ns, (long long)last_ns, (long long)end);
    int last = -1;
    for (int i = 0; i < PERSEC_N; i++)
        if (persec[i]) last = i;
    printf("\"per_sec\":[");
    for (int i = 0; i <= last; i++) printf("%s%llu", i ? "," : "", (unsigned long long)persec[i]);
    printf("]");
    if (want_hist) {
        printf(",\"hist_us\":[");
        int first = 1;
        for (int i = 0; i < HIST_N; i++)
            if (hist[i]) {
                printf("%s[%.1f,%llu]", first ? "" : ",", hist_value(i), (unsigned long long)hist[i]);
                first = 0;
            }
        printf("],\"lat_max_us\":%lld,\"done_hist_us\":[", (long long)lat_max_us);
        first = 1;
        for (int i = 0; i < HIST_N; i++)
            if (done_hist[i]) {
                printf("%s[%.1f,%llu]", first ? "" : ",", hist_value(i), (unsigned long long)done_hist[i]);
                first = 0;
            }
        printf("],\"done_max_us\":%lld", (long long)done_max_us);
    }
    if (per_offset) { /* [offset, max latency us over this process's connections, receivers] */
        printf(",\"per_offset\":[");
        int first = 1;
        for (int i = 0; i < PER_OFF_N; i++) {
            if (off_count[i]) {
                printf("%s[%d,%lld,%u]", first ? "" : ",", i, (long long)off_max_us[i], off_count[i]);
                first = 0;
            }
        }
        printf("],\"per_offset_beyond\":%llu", (unsigned long long)off_beyond);
    }
    printf("}\n");
    fflush(stdout);
}

/* ---------- main ---------- */
static void on_signal(int sig) {
    (void)sig;
    stop_flag = 1;
}

static int is_loopback(const char *ip) {
    struct in_addr a;
    if (inet_pton(AF_INET, ip, &a) != 1) return 0;
    return (ntohl(a.s_addr) >> 24) == 127;
}

static void usage(void) {
    fprintf(stderr,
            "usage: loadgen [mode] [options]\n"
            "modes: (default: subscribe) --recover --idle --echo --chatsocket\n"
            "  -H, --host IP           loopback server address (127.0.0.0/8) [127.0.0.1]\n"
            "  -p, --port N            server port [8888]\n"
            "  -P, --path PATH         upgrade path [/ws; /websocket for --echo; /chatsocket]\n"
            "  -n, --conns N           connections [100]\n"
            "      --conn-offset I     index of the first connection (channel = (I+i) %% channels) [0]\n"
            "      --src-ips K         spread over source IPs 127.0.0.B..127.0.0.(B+K-1) [1]\n"
            "      --src-base B        first source IP's last octet [1]\n"
            "  -c, --channels C        channels [1]\n"
            "      --channel-fmt FMT   printf format with one %%d [bench:c%%d]\n"
            "      --since-offset O    subscribe with since.offset=O\n"
            "      --since-epoch E     ... and since.epoch=E\n"
            "      --token JWT         send a connect command with this token first\n"
            "  -e, --expect M          messages expected per connection (loss = expected - received)\n"
            "  -d, --duration S        hard time cap in seconds, also the hold time for --idle [30]\n"
            "  -q, --quiet S           stop S seconds after the last message (0: never) [3]\n"
            "      --ready-timeout S   give up waiting for all connections after S seconds [60]\n"
            "      --max-pending P     at most P connections handshaking at once (0: all at once) [0]\n"
            "      --rounds R          echo round trips per connection (0: until duration) [0]\n"
            "      --echo-size B       echo message size in bytes [32]\n"
            "      --origin URL        send this Origin header\n"
            "      --hist              include the latency histogram in the JSON (for merging)\n"
            "      --busy-poll         never sleep in epoll_wait: the server's writes then never have to wake\n"
            "                          this process (on a VM a cross-CPU wakeup costs the writer microseconds)\n"
            "      --per-offset        per publication offset (1..4095): max latency over this process's\n"
            "                          connections and receiver count, as \"per_offset\" in the JSON\n");
}

static int busy_poll = 0;

int main(int argc, char **argv) {
    static struct option opts[] = {
        {"recover", no_argument, 0, 1},        {"idle", no_argument, 0, 2},
        {"echo", no_argument, 0, 3},           {"chatsocket", no_argument, 0, 4},
        {"host", required_argument, 0, 'H'},   {"port", required_argument, 0, 'p'},
        {"path", required_argument, 0, 'P'},   {"conns", required_argument, 0, 'n'},
        {"conn-offset", required_argument, 0, 5}, {"src-ips", required_argument, 0, 6},
        {"src-base", required_argument, 0, 7}, {"channels", required_argument, 0, 'c'},
        {"channel-fmt", required_argument, 0, 8}, {"since-offset", required_argument, 0, 9},
        {"since-epoch", required_argument, 0, 10}, {"expect", required_argument, 0, 'e'},
        {"duration", required_argument, 0, 'd'}, {"quiet", required_argument, 0, 'q'},
        {"ready-timeout", required_argument, 0, 11}, {"max-pending", required_argument, 0, 12},
        {"rounds", required_argument, 0, 13}, {"echo-size", required_argument, 0, 14},
        {"origin", required_argument, 0, 15}, {"hist", no_argument, 0, 16},
        {"token", required_argument, 0, 17},   {"per-offset", no_argument, 0, 18},
        {"busy-poll", no_argument, 0, 19},
        {"help", no_argument, 0, 'h'},
        {0, 0, 0, 0}};
    int o;
    while ((o = getopt_long(argc, argv, "H:p:P:n:c:e:d:q:h", opts, NULL)) != -1) {
        switch (o) {
        case 1: mode = M_RECOVER; break;
        case 2: mode = M_IDLE; break;
        case 3: mode = M_ECHO; break;
        case 4: mode = M_CHAT; break;
        case 'H': host = optarg; break;
        case 'p': port = atoi(optarg); break;
        case 'P': path = optarg; break;
        case 'n': nconns = atoi(optarg); break;
        case 5: conn_offset = atoi(optarg); break;
        case 6: nsrc = atoi(optarg); break;
        case 7: src_base = atoi(optarg); break;
        case 'c': nchannels = atoi(optarg); break;
        case 8: channel_fmt = optarg; break;
        case 9: since_offset = atoll(optarg); break;
        case 10: since_epoch = optarg; break;
        case 'e': expect = atoll(optarg); break;
        case 'd': duration = atof(optarg); break;
        case 'q': quiet = atof(optarg); break;
        case 11: ready_timeout = atof(optarg); break;
        case 12: max_pending = atoi(optarg); break;
        case 13: echo_rounds = atoi(optarg); break;
        case 14: echo_size = atoi(optarg); break;
        case 15: origin = optarg; break;
        case 16: want_hist = 1; break;
        case 17: token = optarg; break;
        case 18: per_offset = 1; break;
        case 19: busy_poll = 1; break;
        case 'h': usage(); return 0;
        default: usage(); return 2;
        }
    }
    if (!path) path = mode == M_ECHO ? "/websocket" : mode == M_CHAT ? "/chatsocket" : "/ws";
    if (!is_loopback(host)) {
        fprintf(stderr, "refusing non-loopback host %s (127.0.0.0/8 only)\n", host);
        return 2;
    }
    if (nsrc < 1 || src_base < 1 || src_base + nsrc - 1 > 254) {
        fprintf(stderr, "source IPs must stay within 127.0.0.1..127.0.0.254\n");
        return 2;
    }
    if (nconns < 1 || nchannels < 1 || duration <= 0 || duration > 3600) {
        fprintf(stderr, "bad --conns/--channels/--duration\n");
        return 2;
    }
    {
        int pcts = 0, bad = 0;
        for (const char *f = channel_fmt; *f; f++)
            if (*f == '%') {
                if (f[1] == 'd') {
                    pcts++;
                    f++;
                } else {
                    bad = 1;
                }
            }
        if (bad || pcts > 1 || strlen(channel_fmt) > 250) {
            fprintf(stderr, "--channel-fmt may contain at most one %%d and no other %%\n");
            return 2;
        }
    }
    if (mode == M_RECOVER && since_offset < 0) since_offset = 0;
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
        if ((rlim_t)nconns + 16 > rl.rlim_cur)
            fprintf(stderr, "warning: %d connections but only %llu open files allowed; use more processes\n",
                    nconns, (unsigned long long)rl.rlim_cur);
    }
    struct sigaction sa = {.sa_handler = on_signal};
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGUSR1, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);
    rng ^= (uint64_t)getpid() * 0x100000001B3ull;

    conns = calloc((size_t)nconns, sizeof(conn));
    for (int i = 0; i < nconns; i++) {
        conns[i].fd = -1;
        conns[i].idx = (uint32_t)i;
        conns[i].last_off = -1;
    }
    rbuf_cap = RCHUNK + 65536;
    rbuf = malloc(rbuf_cap);
    ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event evs[1024];
    start_ns = now_ns();
    int64_t hard_end = start_ns + (int64_t)(duration * 1e9);
    start_more();
    while (!stop_flag) {
        int n = epoll_wait(ep, evs, 1024, busy_poll ? 0 : 20);
        if (n < 0 && errno != EINTR) break;
        if (n == 0 && busy_poll) sched_yield();  /* let the publisher on this CPU run */
        for (int i = 0; i < n; i++) on_event((conn *)evs[i].data.ptr, evs[i].events);
        start_more();
        int64_t t = now_ns();
        if (t >= hard_end) break;
        if (!ready_printed && t - start_ns > (int64_t)(ready_timeout * 1e9)) {
            error_kind("ready_timeout");
            ready_printed = 1;
            ready_ns = t;
            fprintf(stderr, "READY {\"connections\":%d,\"subscribed\":%d,\"ms\":%.1f,\"timeout\":true}\n",
                    n_established, n_subscribed, (double)(ready_ns - start_ns) / 1e6);
            fflush(stderr);
        }
        if (!ready_printed) continue;
        if (mode == M_IDLE) {
            if (n_open == 0) break;
            continue;
        }
        if (expect > 0 && n_done >= (mode == M_ECHO ? n_established : n_subscribed) && n_done > 0) break;
        if (n_open == 0) break;
        if (quiet > 0 && last_ns && t - last_ns > (int64_t)(quiet * 1e9)) break;
    }
    stop_ns = now_ns();
    if (!all_done_ns && expect > 0 && n_done > 0 && n_done >= n_subscribed) all_done_ns = stop_ns;
    stop_flag = 1;
    /* say goodbye: a close frame (1000) to every open connection, best effort */
    for (int i = 0; i < nconns; i++) {
        conn *c = &conns[i];
        if (c->state == S_CLOSED || c->fd < 0) continue;
        if (c->state != S_CONNECTING && c->state != S_NEW && !c->sent_close) {
            uint8_t b[2] = {0x03, 0xE8};
            c->out_len = 0;
            send_frame(c, 0x8, b, 2);
            c->sent_close = 1;
        }
        shutdown(c->fd, SHUT_WR);
    }
    print_report();
    for (int i = 0; i < nconns; i++)
        if (conns[i].fd >= 0) close(conns[i].fd);
    return 0;
}
