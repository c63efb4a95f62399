-- Insert-mode keys. Each acts on the ghost text when one is shown and otherwise does what the
-- key did before (the earlier mapping, or the key itself).
local config = require("codellama.config")

local M = {}

local api = vim.api

--- Put keys at the front of the typeahead (keys typed after this one come after them).
---@param keys string
---@param mode string "n" (no remapping) or "m"
local function feed(keys, mode)
  api.nvim_feedkeys(api.nvim_replace_termcodes(keys, true, false, true), mode .. "i", false)
end

--- What the key did before this plugin mapped it.
---@param lhs string
---@return fun()
local function fallback_for(lhs)
  local prev = vim.fn.maparg(lhs, "i", false, true)
  if type(prev) ~= "table" or vim.tbl_isempty(prev) or (prev.desc or ""):find("^codellama:") then
    return function()
      feed(lhs, "n")
    end
  end
  local mode = prev.noremap == 1 and "n" or "m"
  return function()
    local keys = prev.rhs
    if prev.callback then
      keys = prev.callback()
      if prev.expr ~= 1 then
        return
      end
    elseif prev.expr == 1 then
      keys = vim.fn.eval(prev.rhs)
    end
    if type(keys) == "string" and keys ~= "" then
      feed(keys, mode)
    end
  end
end

-- Mapped keys, to unmap on a later setup().
local mapped = {}

--- Map the configured keys (again).
---@param actions table<string, fun(): boolean> name -> action (true when it did something)
function M.setup(actions)
  for _, lhs in ipairs(mapped) do
    pcall(api.nvim_del_keymap, "i", lhs)
  end
  mapped = {}
  for name, lhs in pairs(config.options.keymaps) do
    local action = actions[name]
    if lhs and action then
      local fallback = fallback_for(lhs)
      vim.keymap.set("i", lhs, function()
        if not action() then
          fallback()
        end
      end, { silent = true, desc = "codellama: " .. name:gsub("_", " ") })
      mapped[#mapped + 1] = lhs
    end
  end
end

return M
