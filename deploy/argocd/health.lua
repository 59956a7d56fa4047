-- Argo CD health check for dbsync.io/DatabaseSync.
--
-- Argo CD runs this with `obj` set to the live resource and expects a table with `status`
-- (Healthy, Progressing, Degraded, Suspended) and `message`. It decides on condition types,
-- condition reasons and fields, never on message text, so rewording a message cannot change
-- an application's health. The checks run in this order:
--   1. metadata.deletionTimestamp set         -> Progressing (the resource is being deleted)
--   2. spec.suspend true                      -> Suspended
--   3. status.observedGeneration < generation -> Progressing (the status describes an older spec)
--   4. Stalled=True                           -> Degraded (a person must act)
--   5. Ready=False with reason ApprovalPending, PlanChanged or PlanExpired
--                                             -> Suspended (a plan waits for approval)
--   6. Reconciling=True                       -> Progressing
--   7. Ready=True                             -> Healthy
--   8. anything else                          -> Progressing
-- Written for Lua 5.1, the language version of the interpreter Argo CD embeds (gopher-lua).

local function find_condition(conditions, condition_type)
  if conditions == nil then
    return nil
  end
  for _, condition in ipairs(conditions) do
    if condition.type == condition_type then
      return condition
    end
  end
  return nil
end

-- The condition's message, or its reason when the message is empty.
local function describe(condition, fallback)
  if condition.message ~= nil and condition.message ~= "" then
    return condition.message
  end
  if condition.reason ~= nil and condition.reason ~= "" then
    return condition.reason
  end
  return fallback
end

local hs = {}

if obj.metadata ~= nil and obj.metadata.deletionTimestamp ~= nil then
  hs.status = "Progressing"
  hs.message = "DatabaseSync is being deleted"
  return hs
end

if obj.spec ~= nil and obj.spec.suspend == true then
  hs.status = "Suspended"
  hs.message = "DatabaseSync is suspended (spec.suspend is true)"
  return hs
end

local status = obj.status
local generation = nil
if obj.metadata ~= nil then
  generation = obj.metadata.generation
end

if status == nil or status.observedGeneration == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to report status"
  return hs
end

if generation ~= nil and status.observedGeneration < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. tostring(generation) ..
    " (status describes generation " .. tostring(status.observedGeneration) .. ")"
  return hs
end

local conditions = status.conditions
local ready = find_condition(conditions, "Ready")
local reconciling = find_condition(conditions, "Reconciling")
local stalled = find_condition(conditions, "Stalled")

if stalled ~= nil and stalled.status == "True" then
  hs.status = "Degraded"
  hs.message = describe(stalled, "Stalled")
  return hs
end

-- Reasons under which a published plan waits for a person to approve it.
local waiting_for_approval = {ApprovalPending = true, PlanChanged = true, PlanExpired = true}

if ready ~= nil and ready.status == "False" and ready.reason ~= nil and
    waiting_for_approval[ready.reason] then
  hs.status = "Suspended"
  hs.message = describe(ready, "Waiting for approval")
  return hs
end

if reconciling ~= nil and reconciling.status == "True" then
  hs.status = "Progressing"
  hs.message = describe(reconciling, "Reconciling")
  return hs
end

if ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
  hs.message = describe(ready, "Ready")
  return hs
end

hs.status = "Progressing"
if ready ~= nil then
  hs.message = describe(ready, "Not ready")
else
  hs.message = "Waiting for the Ready condition"
end
return hs
