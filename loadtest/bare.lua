-- GET / on the bare hyper server (bench-hyper): the ceiling.
local dir = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
local c = dofile(dir .. "common.lua")

done = c.done
