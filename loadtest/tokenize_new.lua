-- POST /v1/tokens with a fresh random Luhn-valid card on every request: a new token, 201.
local dir = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
local c = dofile(dir .. "common.lua")

setup = c.setup
done = c.done

local h

function init(args)
  c.seed()
  h = c.headers()
end

function request()
  return wrk.format("POST", "/v1/tokens", h, c.tokenize_body(c.random_pan()))
end
