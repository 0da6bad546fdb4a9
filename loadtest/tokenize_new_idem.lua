-- As tokenize_new.lua, with a fresh Idempotency-Key on every request (as real clients send):
-- two more Redis round trips per request (claim the key, store the response).
local dir = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
local c = dofile(dir .. "common.lua")

setup = c.setup
done = c.done

local h
local n = 0
local run

function init(args)
  c.seed()
  h = c.headers()
  run = string.format("%d-%d-%d", os.time(), tonumber(tid) or 0, math.random(1000000000))
end

function request()
  n = n + 1
  h["Idempotency-Key"] = "lt-" .. run .. "-" .. n
  return wrk.format("POST", "/v1/tokens", h, c.tokenize_body(c.random_pan()))
end
