-- Argo CD health of a Portico ServicePolicy or L7Policy (lb.portico.dev), from the
-- conditions the operator writes: Degraded when it is not accepted or loses a conflict,
-- Progressing until the operator has looked at the current generation and while nodes
-- have yet to program it, Healthy once every node with a ready agent has.
local hs = {status = "Progressing", message = "Waiting for the Portico operator"}
if obj.status == nil or obj.status.conditions == nil then
  return hs
end
local found = {}
for _, c in ipairs(obj.status.conditions) do
  if obj.metadata.generation ~= nil and c.observedGeneration ~= nil and c.observedGeneration < obj.metadata.generation then
    hs.message = "Waiting for the Portico operator to observe generation " .. obj.metadata.generation
    return hs
  end
  found[c.type] = c
end
local accepted, conflict, programmed = found["Accepted"], found["Conflict"], found["Programmed"]
if accepted == nil then
  return hs
end
if accepted.status ~= "True" then
  hs.status = "Degraded"
  hs.message = accepted.message
elseif conflict ~= nil and conflict.status == "True" then
  hs.status = "Degraded"
  hs.message = conflict.message
elseif programmed ~= nil and programmed.status ~= "True" then
  hs.message = programmed.message
else
  hs.status = "Healthy"
  hs.message = (programmed or accepted).message
end
return hs
