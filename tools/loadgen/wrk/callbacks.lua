-- wrk script: POSTs pre-signed Plivo status callbacks, each once, from the file that
-- `smsflow-loadgen sign` wrote (one request per line: signature TAB nonce TAB form body).
--
--   wrk -t2 -c64 -d10s -s tools/loadgen/wrk/callbacks.lua http://127.0.0.1:8080/plivo/callback -- FILE THREADS
--
-- THREADS must equal -t: thread n of THREADS sends lines n, n + THREADS, ... so no callback
-- is sent twice. The requests are built in init(), before wrk starts its clock. If a thread runs
-- out of lines it repeats its last one (the ingress answers such a replay without publishing
-- it) and done() reports "exhausted": the run is then too long for the file and not valid.
-- done() prints one JSON line, {"mode": "wrk", "report": {...}}, for tools/bench.

local threads = {}

function setup(thread)
   table.insert(threads, thread)
   thread:set("id", #threads)
end

function init(args)
   local path, count = args[1], tonumber(args[2])
   assert(path and count, "usage: -- FILE THREADS")
   requests, sent, exhausted = {}, 0, false
   local n = 0
   for line in io.lines(path) do
      if n % count == id - 1 then
         local signature, nonce, body = line:match("^([^\t]*)\t([^\t]*)\t(.*)$")
         assert(signature, "a line without three tab-separated fields")
         requests[#requests + 1] = wrk.format("POST", nil, {
            ["Content-Type"] = "application/x-www-form-urlencoded",
            ["X-Plivo-Signature-V3"] = signature,
            ["X-Plivo-Signature-V3-Nonce"] = nonce,
         }, body)
      end
      n = n + 1
   end
   assert(#requests > 0, "no request for thread " .. id)
end

function request()
   if sent < #requests then
      sent = sent + 1
   else
      exhausted = true
   end
   return requests[sent]
end

function done(summary, latency, _)
   local sent_total, any_exhausted = 0, false
   for _, thread in ipairs(threads) do
      sent_total = sent_total + thread:get("sent")
      any_exhausted = any_exhausted or thread:get("exhausted")
   end
   local ms = function(us) return us / 1000.0 end
   local e = summary.errors
   io.write(string.format(
      '{"mode":"wrk","report":{"requests":%d,"sent":%d,"duration_seconds":%.6f,"requests_per_second":%.1f,' ..
      '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},"exhausted":%s,' ..
      '"latency_ms":{"p50":%.3f,"p90":%.3f,"p99":%.3f,"p999":%.3f,"max":%.3f}}}\n',
      summary.requests, sent_total, summary.duration / 1e6, summary.requests / (summary.duration / 1e6),
      e.connect, e.read, e.write, e.status, e.timeout, tostring(any_exhausted),
      ms(latency:percentile(50)), ms(latency:percentile(90)), ms(latency:percentile(99)),
      ms(latency:percentile(99.9)), ms(latency.max)))
end
