-- wrk script for bench/run: POST one chat completion per request, then print one
-- machine-readable line (BENCH_RESULT {...}) that bench/harness.py parses.
-- BENCH_MODEL: the model name to ask for; BENCH_KEY: the Bearer key (empty: no header).
local model = os.getenv("BENCH_MODEL") or "bench"
local key = os.getenv("BENCH_KEY") or ""

wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
if key ~= "" then
    wrk.headers["Authorization"] = "Bearer " .. key
end
wrk.body = '{"model":"' .. model .. '","messages":['
    .. '{"role":"system","content":"You are a helpful assistant. Answer briefly."},'
    .. '{"role":"user","content":"What is the capital of France? Answer in one sentence."}'
    .. '],"max_tokens":64,"temperature":0}'

done = function(summary, latency, requests)
    local e = summary.errors
    io.write(string.format(
        'BENCH_RESULT {"requests":%d,"duration_us":%d,"bytes":%d,'
            .. '"p50_us":%.1f,"p90_us":%.1f,"p99_us":%.1f,"mean_us":%.1f,"max_us":%.1f,'
            .. '"err_connect":%d,"err_read":%d,"err_write":%d,"err_status":%d,"err_timeout":%d}\n',
        summary.requests, summary.duration, summary.bytes,
        latency:percentile(50), latency:percentile(90), latency:percentile(99),
        latency.mean, latency.max,
        e.connect, e.read, e.write, e.status, e.timeout))
end
