# Sourced by the benchmarks: the CPU time the whole machine spends while a command runs
# (user, system and interrupt time of every process and kernel thread, so the kernel's
# writeback counts too; anything else running at the time counts as well).
#
# With it a benchmark prints, beside each ratio, the ratio no scheduling could beat on
# this machine: the command's CPU time spread over every core, against the baseline's
# wall time. A target below that floor needs less work or more cores, not better overlap.

clock_ticks=$(getconf CLK_TCK)
cores=$(nproc)

# busy_ticks: CPU time spent since boot, in clock ticks.
busy_ticks() { awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 + $9 }' /proc/stat; }
# cpu_seconds T0 T1: the ticks between two busy_ticks, in seconds.
cpu_seconds() { awk -v a="$1" -v b="$2" -v hz="$clock_ticks" 'BEGIN { printf "%.2f", (b - a) / hz }'; }
# floor_ratio CPU_S BASE_WALL_S: CPU_S spread over every core, against BASE_WALL_S.
floor_ratio() { awk -v c="$1" -v w="$2" -v n="$cores" 'BEGIN { printf "%.2f", c / n / w }'; }
