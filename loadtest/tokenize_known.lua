-- POST /v1/tokens with a card the merchant already tokenized (TG_PANS_FILE): dedup hit, 200.
local dir = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
local c = dofile(dir .. "common.lua")

setup = c.setup
done = c.done

local reqs = {}

function init(args)
  c.seed()
  local h = c.headers()
  for i, pan in ipairs(c.lines(os.getenv("TG_PANS_FILE"))) do
    reqs[i] = wrk.format("POST", "/v1/tokens", h, c.tokenize_body(pan))
  end
end

function request()
  return reqs[math.random(#reqs)]
end
