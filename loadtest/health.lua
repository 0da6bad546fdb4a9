-- GET /healthz on the gateway: the HTTP stack alone (no authentication, no store).
local dir = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
local c = dofile(dir .. "common.lua")

wrk.path = "/healthz"
done = c.done
