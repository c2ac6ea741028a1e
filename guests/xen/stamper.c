/* stamper: the in-guest workload of vmem's Xen tests (static, runs as a PVH domU's init child).
 *
 * It keeps MIB mebibytes of stamped pages and rewrites RATE pages a second, in index order,
 * each with the next generation number.  Invariant at every instant (a migration must keep it):
 *   pages [0, cursor) carry generation pass+1, pages [cursor, npages) carry generation pass,
 * and every word of a page is a function of (page index, generation, word index).  A page that
 * migration lost (an old copy) breaks the generation order; a torn page breaks the words.
 * Every CHECK seconds it verifies all pages and prints one line to the console:
 *   STAMP n=<check#> pass=<pass> cursor=<page> pages=<npages> bad=<bad now> total_bad=<bad ever>
 *         max_gap_ms=<longest stall of the writer loop seen so far>
 * max_gap_ms is what the guest itself saw of a pause (downtime, seen from inside).
 * Usage: stamper MIB RATE_PAGES_PER_S CHECK_S [inject]
 * "inject" (tests only) puts an old generation into one page after the first check: the next
 * check must report bad=1 -- the proof that the check can fail.
 * "die" (tests only) dies of SIGILL right after "STAMP start", as the stamper did when the
 * nested host's AVX emulation failed it (docs/xen.md): the guest's init must report it.
 */
#include <string.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <signal.h>
#include <sys/mman.h>
#include <time.h>

#define PAGE 4096
#define WORDS (PAGE / 8)
#define MAGIC 0x504d54534d454d56ULL /* "VMEMSTMP" */

static uint64_t word(uint64_t page, uint64_t gen, uint64_t j)
{
    uint64_t x = (page << 20) ^ (gen << 40) ^ j ^ 0x9e3779b97f4a7c15ULL;
    x ^= x >> 33; x *= 0xff51afd7ed558ccdULL; x ^= x >> 33;
    return x;
}

static void stamp(uint64_t *p, uint64_t page, uint64_t gen)
{
    p[0] = MAGIC; p[1] = page; p[2] = gen;
    for (uint64_t j = 3; j < WORDS; j++) p[j] = word(page, gen, j);
}

/* 1 if the page is whole and carries generation `gen`. */
static int good(const uint64_t *p, uint64_t page, uint64_t gen)
{
    if (p[0] != MAGIC || p[1] != page || p[2] != gen) return 0;
    for (uint64_t j = 3; j < WORDS; j += 61) /* a stride keeps a check cheap under TCG */
        if (p[j] != word(page, gen, j)) return 0;
    return p[WORDS - 1] == word(page, gen, WORDS - 1);
}

static double now_s(void)
{
    struct timespec ts; clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
    uint64_t mib = argc > 1 ? strtoull(argv[1], 0, 0) : 16;
    double rate = argc > 2 ? atof(argv[2]) : 2000;
    double check_s = argc > 3 ? atof(argv[3]) : 2;
    int inject = argc > 4 && !strcmp(argv[4], "inject");
    int die = argc > 4 && !strcmp(argv[4], "die");
    uint64_t npages = mib * 256, pass = 1, cursor = 0, n = 0, total_bad = 0;
    uint64_t *ram = mmap(0, npages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (ram == MAP_FAILED) { perror("STAMP mmap"); return 1; }
    for (uint64_t i = 0; i < npages; i++) stamp(ram + i * WORDS, i, pass);
    printf("STAMP start pages=%llu rate=%.0f check_s=%.1f\n", (unsigned long long)npages, rate, check_s);
    fflush(stdout);
    if (die) raise(SIGILL);
    double t0 = now_s(), last = t0, next_check = t0 + check_s, max_gap = 0, owed = 0;
    for (;;) {
        struct timespec tick = {0, 10 * 1000 * 1000};
        nanosleep(&tick, 0);
        double t = now_s();
        if (t - last > max_gap) max_gap = t - last;
        owed += (t - last) * rate; last = t;
        if (owed > rate) owed = rate; /* after a stall, do not burst more than a second's worth */
        for (; owed >= 1; owed -= 1) {
            stamp(ram + cursor * WORDS, cursor, pass + 1);
            if (++cursor == npages) { cursor = 0; pass++; }
        }
        if (t < next_check) continue;
        uint64_t bad = 0, first = npages;
        for (uint64_t i = 0; i < npages; i++)
            if (!good(ram + i * WORDS, i, i < cursor ? pass + 1 : pass)) { bad++; if (first == npages) first = i; }
        total_bad += bad;
        printf("STAMP n=%llu pass=%llu cursor=%llu pages=%llu bad=%llu total_bad=%llu max_gap_ms=%.0f",
               (unsigned long long)++n, (unsigned long long)pass, (unsigned long long)cursor,
               (unsigned long long)npages, (unsigned long long)bad, (unsigned long long)total_bad, max_gap * 1e3);
        if (bad) printf(" first_bad=%llu gen_seen=%llu", (unsigned long long)first, (unsigned long long)ram[first * WORDS + 2]);
        printf("\n"); fflush(stdout);
        if (inject && n == 1) { /* a lost page: the copy from before its last rewrite */
            uint64_t p = (cursor + npages / 2) % npages; /* far from the writer: not healed soon */
            stamp(ram + p * WORDS, p, (p < cursor ? pass + 1 : pass) - 1);
        }
        next_check = now_s() + check_s;
        last = now_s(); /* the check itself is not a stall */
    }
}
