-- Shared by the scenario scripts: per-thread random seeds, the data files the harness writes,
-- random Luhn-valid cards, and one machine-readable result line (WRK_RESULT) that
-- `tokengate loadtest` parses.
--
-- Environment: TG_API_KEY (merchant API key), TG_IDS_FILE (token ids, one a line),
-- TG_PANS_FILE (cards the merchant already tokenized, one a line).

local M = {}

local threads = 0

-- Runs in the main Lua state once per thread: gives each thread its own number (a global in
-- the thread's state) so the threads draw different random cards.
function M.setup(thread)
  threads = threads + 1
  thread:set("tid", threads)
end

function M.seed()
  local t = tonumber(tid) or 0
  math.randomseed(os.time() * 1000 + t * 7919 + math.floor(os.clock() * 1000000))
  -- The first values after seeding are poorly mixed in some Lua versions.
  for _ = 1, 10 do math.random() end
end

function M.lines(path)
  local t = {}
  if not path then return t end
  for l in io.lines(path) do
    if #l > 0 then t[#t + 1] = l end
  end
  return t
end

function M.headers()
  return {
    ["Authorization"] = "Bearer " .. (os.getenv("TG_API_KEY") or ""),
    ["Content-Type"] = "application/json",
  }
end

-- A random 16-digit Visa-range PAN with a correct Luhn check digit.
function M.random_pan()
  local d = { 4 }
  for i = 2, 15 do d[i] = math.random(0, 9) end
  local sum = 0
  for i = 1, 15 do
    local v = d[i]
    -- Position from the right once the check digit is appended: odd positions double.
    if (16 - i) % 2 == 1 then
      v = v * 2
      if v > 9 then v = v - 9 end
    end
    sum = sum + v
  end
  d[16] = (10 - sum % 10) % 10
  return table.concat(d)
end

function M.tokenize_body(pan)
  return '{"card":{"number":"' .. pan .. '","expiryMonth":12,"expiryYear":2030},"usage":"CARD_ON_FILE"}'
end

M.cryptogram_body = '{"transactionType":"CIT","amount":{"value":1299,"currency":"EUR"}}'

function M.done(summary, latency, requests)
  local secs = summary.duration / 1000000
  local e = summary.errors
  io.write(string.format(
    "WRK_RESULT requests=%d duration_s=%.3f rps=%.1f p50_us=%d p99_us=%d p999_us=%d max_us=%d non2xx=%d connect_err=%d read_err=%d write_err=%d timeout_err=%d\n",
    summary.requests, secs, summary.requests / secs,
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9), latency.max,
    e.status, e.connect, e.read, e.write, e.timeout))
end

return M
