-- POST /v1/tokens/{id}/cryptograms on a random known ACTIVE token (TG_IDS_FILE): 201.
local dir = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
local c = dofile(dir .. "common.lua")

setup = c.setup
done = c.done

local reqs = {}

function init(args)
  c.seed()
  local h = c.headers()
  for i, id in ipairs(c.lines(os.getenv("TG_IDS_FILE"))) do
    reqs[i] = wrk.format("POST", "/v1/tokens/" .. id .. "/cryptograms", h, c.cryptogram_body)
  end
end

function request()
  return reqs[math.random(#reqs)]
end
