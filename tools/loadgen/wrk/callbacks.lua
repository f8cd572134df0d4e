-- wrk script: POSTs pre-signed Plivo status callbacks, each once, from the files that
-- `smsflow-loadgen sign --out PREFIX --threads N` wrote (whole HTTP requests, each followed by
-- a NUL byte; PREFIX.0 for the first thread, PREFIX.1 for the second, ...).
--
--   wrk -t2 -c64 -d10s -s tools/loadgen/wrk/callbacks.lua http://127.0.0.1:8080/plivo/callback -- PREFIX
--
-- -t must equal sign's --threads. Each thread reads only its own file in init(). wrk starts a
-- thread as soon as its init() returned, and its clock once every thread has started, so the
-- first threads send a little before the clock starts, while the last one reads its file: a
-- short lead, which slightly overstates the rate of a short run. If a thread runs out of requests it
-- repeats its last one (the ingress answers such a replay without publishing it) and done()
-- reports "exhausted": the run is then too long for the files and not valid.
-- done() prints one JSON line, {"mode": "wrk", "report": {...}}, for tools/bench.

local threads = {}

function setup(thread)
   table.insert(threads, thread)
   thread:set("id", #threads)
end

function init(args)
   local prefix = assert(args[1], "usage: -- PREFIX (the --out given to smsflow-loadgen sign)")
   local file = assert(io.open(prefix .. "." .. (id - 1), "rb"))
   local data = file:read("*a")
   file:close()
   requests, sent, exhausted = {}, 0, false
   for request in data:gmatch("([^%z]+)%z") do
      requests[#requests + 1] = request
   end
   assert(#requests > 0, "no request for thread " .. id)
   -- wrk calls request() once on the first thread's state to check it before the run: that
   -- call must not use up a request.
   checking = id == 1
end

function request()
   if checking then
      checking = false
      return requests[1]
   end
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
