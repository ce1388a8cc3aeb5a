-- wrk -s bench/wrk-percentiles.lua: prints req/s, the mean and ten latency
-- percentiles (ms) on one line, to see the shape of the distribution (wrk's
-- --latency gives four). Used in BENCHMARKS.md, "The pool's queue".
done = function(summary, latency, requests)
  local out = {}
  for _, p in ipairs({1, 5, 10, 25, 50, 75, 90, 95, 99, 99.9}) do
    out[#out + 1] = string.format("p%s=%.2f", p, latency:percentile(p) / 1000)
  end
  io.write(string.format("rps=%.0f mean=%.2f ", summary.requests / (summary.duration / 1e6),
    latency.mean / 1000), table.concat(out, " "), "\n")
end
