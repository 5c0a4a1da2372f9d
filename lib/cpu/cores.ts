/**
 * How many cores this process may use: the CPU affinity mask (what Node's
 * availableParallelism reports) capped by a cgroup CPU quota (containers), so that the
 * default thread count never oversubscribes what the process is given.
 */
import { readFileSync } from "node:fs";
import { availableParallelism } from "node:os";

let cached = 0;

function cgroupQuota(): number {
  try {
    // cgroup v2: "max 100000" or "<quota> <period>"
    const [quota, period] = readFileSync("/sys/fs/cgroup/cpu.max", "utf8").trim().split(/\s+/);
    if (quota && quota !== "max" && Number(period) > 0) return Math.max(1, Math.floor(Number(quota) / Number(period)));
  } catch { /* not cgroup v2, or no limit */ }
  try {
    const quota = Number(readFileSync("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "utf8"));
    const period = Number(readFileSync("/sys/fs/cgroup/cpu/cpu.cfs_period_us", "utf8"));
    if (quota > 0 && period > 0) return Math.max(1, Math.floor(quota / period));
  } catch { /* no cgroup v1 limit either */ }
  return Infinity;
}

export function usableCores(): number {
  if (!cached) cached = Math.max(1, Math.min(availableParallelism(), cgroupQuota()));
  return cached;
}
