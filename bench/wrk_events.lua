-- wrk script for bench/ingest_bench.py: a fresh body per request (unique messageId).
-- Arguments (after "--"): path, batch size, run tag, template file, visitors, Authorization.
-- The template and its placeholders are described in bench/payloads.py.

local next_id = 0
function setup(thread)
  next_id = next_id + 1
  thread:set("tid", next_id)
end

local path, batch, tag, template, visitors, headers
local counter = 0

function init(args)
  path = args[1]
  batch = tonumber(args[2])
  tag = args[3]
  local file = assert(io.open(args[4], "rb"))
  template = file:read("*a")
  file:close()
  visitors = tonumber(args[5])
  headers = { ["Content-Type"] = "application/json", ["Authorization"] = args[6] }
  math.randomseed(os.time() + (tid or 1) * 7919)
end

local last_second, stamp = -1, ""
local function now_iso()
  local t = os.time()
  if t ~= last_second then
    last_second = t
    stamp = os.date("!%Y-%m-%dT%H:%M:%S.000Z", t)
  end
  return stamp
end

local function event()
  counter = counter + 1
  local visitor = math.random(visitors)
  local values = {
    MID = tag .. "-" .. tid .. "-" .. counter,
    AID = string.format("%08x-5e1f-4c2a-9b7d-%012d", visitor, visitor),
    TS = now_iso(),
  }
  return (template:gsub("@@(%u+)@@", values))
end

function request()
  local body
  if batch <= 1 then
    body = event()
  else
    local parts = {}
    for i = 1, batch do parts[i] = event() end
    body = '{"sentAt":"' .. now_iso() .. '","batch":[' .. table.concat(parts, ",") .. "]}"
  end
  return wrk.format("POST", path, headers, body)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_RESULT {"duration_s":%.6f,"completed":%d,"non_2xx":%d,"connect_errors":%d,' ..
    '"read_errors":%d,"write_errors":%d,"timeouts":%d,"p50_ms":%.3f,"p90_ms":%.3f,' ..
    '"p99_ms":%.3f,"max_ms":%.3f,"mean_ms":%.3f}\n',
    summary.duration / 1e6, summary.requests, e.status, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50) / 1e3, latency:percentile(90) / 1e3, latency:percentile(99) / 1e3,
    latency.max / 1e3, latency.mean / 1e3))
end
