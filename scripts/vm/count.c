#include <stdio.h>
#include <stdlib.h>
#include <time.h>
/* count N DIR MIB: the transparent test's counter, with MIB MiB of memory it reads and
   rewrites page by page as it counts, so the result depends on every page CRIU restores. */
int main(int argc, char **argv) {
    unsigned long long n = strtoull(argv[1], 0, 10), acc = 0;
    const char *dir = argv[2];
    size_t size = (size_t)atol(argv[3]) << 20, pages = size / 4096;
    unsigned char *m = malloc(size);
    for (size_t k = 0; k < size; k++) m[k] = (unsigned char)(k * 2654435761u >> 13);
    char p[4096], q[4096];
    snprintf(p, sizeof p, "%s/starts", dir);
    FILE *f = fopen(p, "a"); fprintf(f, "start\n"); fclose(f);
    struct timespec ts = {0, 1000000};
    for (unsigned long long i = 1; i <= n; i++) {
        size_t at = (size_t)((i / 64) % pages) * 4096 + (size_t)(i % 4093);
        acc = acc * 6364136223846793005ULL + i + m[at];
        m[at] ^= (unsigned char)(acc >> 29);
        if (i % 100 == 0) nanosleep(&ts, 0);
    }
    unsigned long long sum = 0;
    for (size_t k = 0; k < size; k += 64) sum = sum * 31 + m[k];
    snprintf(p, sizeof p, "%s/result.tmp", dir);
    snprintf(q, sizeof q, "%s/result", dir);
    f = fopen(p, "w"); fprintf(f, "%llu %llu %llu", n, acc, sum); fclose(f);
    rename(p, q);
    return 0;
}
