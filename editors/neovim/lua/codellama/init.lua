-- codellama.nvim: Code Llama completions (ghost text) and code actions through the
-- codellama-lsp language server. See :help codellama.
local M = {}

local function completion()
  return require("codellama.completion")
end

local function lsp()
  return require("codellama.lsp")
end

local function native()
  return lsp().native()
end

--- Set the plugin up: validate options, map keys, start the server for matching buffers.
---@param opts? table see :help codellama-config
function M.setup(opts)
  local util = require("codellama.util")
  if not util.has("0.9") then
    util.error("Neovim 0.9 or newer is needed")
    return
  end
  require("codellama.config").setup(opts)
  vim.api.nvim_set_hl(0, require("codellama.config").options.ghost_text.hl_group, { link = "Comment", default = true })
  require("codellama.keymaps").setup({
    accept = M.accept,
    accept_word = M.accept_word,
    accept_line = M.accept_line,
    next = function()
      return M.next()
    end,
    prev = function()
      return M.prev()
    end,
    dismiss = M.dismiss,
  })
  lsp().setup()
  M.did_setup = true
end

--- Accept the whole candidate. Returns false when none is shown.
---@return boolean
function M.accept()
  if native() then
    return vim.lsp.inline_completion.get() == true
  end
  return completion().accept()
end

--- Accept the candidate's next word.
---@return boolean
function M.accept_word()
  return not native() and completion().accept_word()
end

--- Accept the rest of the candidate's current line.
---@return boolean
function M.accept_line()
  return not native() and completion().accept_line()
end

---@param count integer
---@return boolean
local function cycle(count)
  if native() then
    local ic = vim.lsp.inline_completion
    local select = ic.select or ic.jump
    return select ~= nil and pcall(select, { count = count })
  end
  if not completion().attached(vim.api.nvim_get_current_buf()) then
    return false
  end
  completion().cycle(count)
  return true
end

--- Show the next candidate (asks for candidates when none is shown).
function M.next()
  return cycle(1)
end

--- Show the previous candidate.
function M.prev()
  return cycle(-1)
end

--- Hide the candidate. Returns false when none was shown.
---@return boolean
function M.dismiss()
  if native() or not completion().visible() then
    return false
  end
  completion().dismiss(vim.api.nvim_get_current_buf())
  return true
end

--- Ask for candidates at the cursor now.
function M.suggest()
  if native() then
    vim.lsp.inline_completion.get()
  else
    completion().suggest()
  end
end

--- Whether a candidate is shown in the current buffer.
---@return boolean
function M.visible()
  return not native() and completion().visible()
end

--- Turn automatic suggestions on or off (nil: toggle).
---@param on? boolean
function M.toggle(on)
  local c = completion()
  if on == nil then
    on = not c.enabled
  end
  c.enabled = on
  if native() then
    vim.lsp.inline_completion.enable(on)
  end
  if not on then
    for _, buf in ipairs(vim.api.nvim_list_bufs()) do
      c.reset(buf)
    end
  end
  require("codellama.util").notify("suggestions " .. (on and "on" or "off"))
end

--- The server's state for a statusline, e.g. "Code Llama: loading 40%"; "" when stopped.
---@return string
function M.status()
  return lsp().status_text()
end

--- Change server settings at run time (see :help codellama-settings).
---@param settings table
function M.update_settings(settings)
  lsp().update_settings(settings)
end

--- Explain, refactor, docstring or tests on lines of the current buffer.
---@param name string
---@param line1? integer
---@param line2? integer
---@param instruction? string
function M.action(name, line1, line2, instruction)
  require("codellama.actions").run(name, line1, line2, instruction)
end

--- vim.lsp.buf.code_action() with this server's actions only.
---@param opts? table
function M.code_action(opts)
  require("codellama.actions").code_action(opts)
end

function M.restart()
  lsp().restart()
end

function M.stop()
  lsp().stop()
end

return M
