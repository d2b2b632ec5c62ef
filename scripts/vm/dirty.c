#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <time.h>
/* dirty MIB PCT_PER_SEC: allocates MIB MiB, touches it all, then writes PCT % of its pages per second, sweeping through memory in order (a working set that moves, as a solver sweeping its grid). */
int main(int argc, char **argv) {
  size_t mib = atol(argv[1]); double pct = atof(argv[2]);
  size_t n = mib << 20, pages = n / 4096; unsigned char *m = malloc(n);
  memset(m, 1, n);
  unsigned long long x = 88172645463325252ULL; size_t cur = 0; size_t per_tick = (size_t)(pages * pct / 100.0 / 10.0);
  for (;;) {
    for (size_t i = 0; i < per_tick; i++) { x ^= x << 13; x ^= x >> 7; x ^= x << 17; m[(cur++ % pages) * 4096] ^= 1; (void)x; }
    struct timespec ts = {0, 100000000}; nanosleep(&ts, 0);
  }
}
