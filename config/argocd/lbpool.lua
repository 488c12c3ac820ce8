-- Argo CD health of a Portico LBPool (lb.portico.dev), from the conditions the operator
-- writes: Healthy when it hands out addresses, Suspended when disabled, Degraded when it is
-- invalid, has no address of its own or overlaps an older pool, Progressing until the
-- operator has looked at the current generation.
local hs = {status = "Progressing", message = "Waiting for the Portico operator"}
if obj.status == nil or obj.status.conditions == nil then
  return hs
end
local ready, conflict
for _, c in ipairs(obj.status.conditions) do
  if obj.metadata.generation ~= nil and c.observedGeneration ~= nil and c.observedGeneration < obj.metadata.generation then
    hs.message = "Waiting for the Portico operator to observe generation " .. obj.metadata.generation
    return hs
  end
  if c.type == "Ready" then
    ready = c
  elseif c.type == "Conflict" then
    conflict = c
  end
end
if ready == nil then
  return hs
end
if ready.status == "True" then
  if conflict ~= nil and conflict.status == "True" then
    hs.status = "Degraded"
    hs.message = conflict.message
  else
    hs.status = "Healthy"
    hs.message = ready.message
  end
elseif ready.reason == "Disabled" then
  hs.status = "Suspended"
  hs.message = ready.message
else
  hs.status = "Degraded"
  hs.message = ready.message
end
return hs
