-- wrk script: POST a chat completion and check every response (status and body).
--
-- Configured from the environment (bench/run.py sets these):
--   BENCH_BODY     request body (JSON)
--   BENCH_KEY      gateway key sent as X-Api-Key (empty: none, for the direct runs)
--   BENCH_STREAM   "1": expect an SSE stream ending in [DONE] with >= BENCH_CHUNKS chunks
--   BENCH_CHUNKS   chat chunks a stream must carry
--   BENCH_FORMAT   "messages": Anthropic Messages answers (events end with message_stop); else chat
-- At the end it prints one line "BENCHJSON {...}" with the counts and latency percentiles (microseconds).

local body = os.getenv("BENCH_BODY")
local key = os.getenv("BENCH_KEY") or ""
local stream = os.getenv("BENCH_STREAM") == "1"
local chunks = tonumber(os.getenv("BENCH_CHUNKS") or "20")
local messages = os.getenv("BENCH_FORMAT") == "messages"  -- Anthropic Messages: its events, its end

wrk.method = "POST"
wrk.body = body
wrk.headers["Content-Type"] = "application/json"
if key ~= "" then wrk.headers["X-Api-Key"] = key end

local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  ok = 0
  bad = 0
  first_bad = ""
end

local DONE = "data: [DONE]\n\n"
local CHUNK = "chat.completion.chunk"
if messages then
  DONE = 'event: message_stop\ndata: {"type":"message_stop"}\n\n'
  CHUNK = "content_block_delta"
end

local function count_chunks(b)
  local n, pos = 0, 1
  while true do
    local s = string.find(b, CHUNK, pos, true)
    if not s then return n end
    n = n + 1
    pos = s + #CHUNK
  end
end

function response(status, headers, b)
  local good
  if status ~= 200 then
    good = false
  elseif stream then
    good = string.sub(b, -#DONE) == DONE and count_chunks(b) >= chunks
  elseif messages then
    good = string.find(b, '"type":"message"', 1, true) ~= nil and string.find(b, '"output_tokens"', 1, true) ~= nil
  else
    good = string.find(b, '"chat.completion"', 1, true) ~= nil and string.find(b, '"total_tokens"', 1, true) ~= nil
  end
  if good then
    ok = ok + 1
  else
    bad = bad + 1
    if first_bad == "" then first_bad = status .. " " .. string.sub(b, 1, 200) end
  end
end

function done(summary, latency, requests)
  local ok_total, bad_total, sample = 0, 0, ""
  for _, t in ipairs(threads) do
    ok_total = ok_total + t:get("ok")
    bad_total = bad_total + t:get("bad")
    local fb = t:get("first_bad")
    if sample == "" and fb ~= nil then sample = fb end
  end
  local e = summary.errors
  sample = string.gsub(sample, '[%c"\\]', " ")
  io.write(string.format(
    'BENCHJSON {"requests":%d,"duration_us":%d,"ok":%d,"bad":%d,"connect_errors":%d,"read_errors":%d,' ..
    '"write_errors":%d,"status_errors":%d,"timeouts":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,' ..
    '"mean_us":%.1f,"first_bad":"%s"}\n',
    summary.requests, summary.duration, ok_total, bad_total, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean, sample))
end
