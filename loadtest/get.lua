-- GET /v1/tokens/{id} of a random known token (TG_IDS_FILE).
local dir = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
local c = dofile(dir .. "common.lua")

setup = c.setup
done = c.done

local reqs = {}

function init(args)
  c.seed()
  local h = c.headers()
  h["Content-Type"] = nil
  for i, id in ipairs(c.lines(os.getenv("TG_IDS_FILE"))) do
    reqs[i] = wrk.format("GET", "/v1/tokens/" .. id, h)
  end
end

function request()
  return reqs[math.random(#reqs)]
end
