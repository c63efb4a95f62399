-- The language server: starting it with vim.lsp.start, attaching buffers, its notifications
-- (codellama/status) and settings (initializationOptions, didChangeConfiguration).
local actions = require("codellama.actions")
local completion = require("codellama.completion")
local config = require("codellama.config")
local ghost = require("codellama.ghost")
local util = require("codellama.util")

local M = {}

local api = vim.api
local NAME = "codellama"

---@class codellama.Status
---@field state string "stopped"|"starting"|"loading"|"ready"|"restarting"|"error"
---@field message string
---@field progress table? { done, total }
M.status = { state = "stopped", message = "" }

--- Whether buffers use Neovim's vim.lsp.inline_completion instead of the plugin's ghost text.
---@return boolean
function M.native()
  local want = config.options.ghost_text.native
  local has = vim.lsp.inline_completion ~= nil and vim.lsp.inline_completion.enable ~= nil
  if want == "auto" then
    return has
  end
  return want == true and has
end

---@param status codellama.Status
local function set_status(status)
  M.status = status
  api.nvim_exec_autocmds("User", { pattern = "CodellamaStatus", modeline = false, data = status })
  pcall(vim.cmd.redrawstatus)
end

local function on_status(_, result)
  if type(result) ~= "table" then
    return
  end
  local previous = M.status.state
  set_status({
    state = tostring(result.state or "unknown"),
    message = tostring(result.message or ""),
    progress = type(result.progress) == "table" and result.progress or nil,
  })
  if result.state == "error" and previous ~= "error" then
    util.error(M.status.message ~= "" and M.status.message or "the server reported an error")
  end
end

---@param bufnr integer
---@return boolean
function M.wants(bufnr)
  if vim.bo[bufnr].buftype ~= "" or vim.bo[bufnr].filetype == "" then
    return false
  end
  local filetypes = config.options.filetypes
  return #filetypes == 0 or vim.tbl_contains(filetypes, vim.bo[bufnr].filetype)
end

---@param bufnr integer
---@return string
local function root_dir(bufnr)
  local name = api.nvim_buf_get_name(bufnr)
  local start = name ~= "" and vim.fs.dirname(name) or vim.fn.getcwd()
  local found = vim.fs.find(config.options.root_markers, { path = start, upward = true })[1]
  return found and vim.fs.dirname(found) or vim.fn.getcwd()
end

local function capabilities()
  local caps = vim.lsp.protocol.make_client_capabilities()
  caps.textDocument = caps.textDocument or {}
  caps.textDocument.inlineCompletion = caps.textDocument.inlineCompletion or { dynamicRegistration = false }
  -- Explain's Markdown comes back as the command's result (shown in a float), rather than as a
  -- file the server asks the editor to open.
  caps.experimental = vim.tbl_extend("force", caps.experimental or {}, { codellama = { explainResult = true } })
  return caps
end

---@param client table
---@param bufnr integer
local function on_attach(client, bufnr)
  if M.native() then
    vim.lsp.inline_completion.enable(true, { bufnr = bufnr, client_id = client.id })
  else
    completion.attach(bufnr)
  end
  api.nvim_exec_autocmds("User", { pattern = "CodellamaAttach", modeline = false, data = { bufnr = bufnr } })
end

---@return table vim.lsp.ClientConfig
function M.client_config(bufnr)
  local settings = config.server_settings()
  return {
    name = NAME,
    cmd = config.cmd(),
    cmd_env = config.options.cmd_env,
    root_dir = root_dir(bufnr),
    init_options = settings,
    settings = { codellama = settings },
    capabilities = capabilities(),
    handlers = {
      ["codellama/status"] = on_status,
      ["workspace/executeCommand"] = actions.on_command_result,
    },
    commands = {
      [actions.COMMANDS.refactor] = actions.refactor_command,
    },
    on_init = function()
      if M.status.state == "starting" then
        set_status({ state = "loading", message = "initialized" })
      end
    end,
    on_attach = on_attach,
    on_exit = function(code)
      vim.schedule(function()
        for _, buf in ipairs(api.nvim_list_bufs()) do
          completion.detach(buf)
          ghost.clear(buf)
        end
        set_status({ state = "stopped", message = ("exited with code %s"):format(code) })
      end)
    end,
  }
end

--- Start the server (or reuse the running one) for a buffer.
---@param bufnr? integer
---@return integer? client_id
function M.start(bufnr)
  bufnr = bufnr or api.nvim_get_current_buf()
  if not M.wants(bufnr) then
    return nil
  end
  local cmd = config.cmd()
  if vim.fn.executable(cmd[1]) ~= 1 then
    if not M.warned_missing then
      M.warned_missing = true
      util.error(("server command not found: %s (see :checkhealth codellama)"):format(cmd[1]))
    end
    return nil
  end
  if not M.client() then
    set_status({ state = "starting", message = table.concat(cmd, " ") })
  end
  return vim.lsp.start(M.client_config(bufnr), {
    bufnr = bufnr,
    reuse_client = function(client, conf)
      return client.name == conf.name and not util.is_stopped(client)
    end,
  })
end

---@return table? client
function M.client()
  return util.get_clients({ name = NAME })[1]
end

--- Stop the server; buffers are detached.
function M.stop()
  local client = M.client()
  if client then
    if util.has("0.11") then
      client:stop()
    else
      client.stop()
    end
  end
end

--- Restart the server and attach every buffer it wants.
function M.restart()
  local client = M.client()
  M.stop()
  local function start_all()
    for _, buf in ipairs(api.nvim_list_bufs()) do
      if api.nvim_buf_is_loaded(buf) and M.wants(buf) then
        M.start(buf)
      end
    end
  end
  if not client then
    start_all()
    return
  end
  local waited = 0
  local timer = util.uv.new_timer()
  timer:start(
    100,
    100,
    vim.schedule_wrap(function()
      waited = waited + 100
      if util.is_stopped(client) or waited >= 5000 then
        timer:stop()
        timer:close()
        start_all()
      end
    end)
  )
end

--- Change server settings at run time (workspace/didChangeConfiguration); model settings take
--- effect after a restart.
---@param settings table in the server's schema
function M.update_settings(settings)
  config.options.settings = vim.tbl_deep_extend("force", config.options.settings, settings)
  local client = M.client()
  if client then
    local all = config.server_settings()
    client.settings = { codellama = all }
    util.notify_server(client, "workspace/didChangeConfiguration", { settings = all })
  end
end

--- The statusline text of the server's state.
---@return string
function M.status_text()
  local s = M.status
  if s.state == "stopped" then
    return ""
  end
  local text = "Code Llama: " .. s.state
  local progress = s.progress
  if s.state == "loading" and progress and tonumber(progress.total) and progress.total > 0 then
    text = ("%s %d%%"):format(text, math.floor(100 * progress.done / progress.total))
  end
  return text
end

local group = api.nvim_create_augroup("codellama.lsp", { clear = true })

--- Attach to matching buffers from now on (and to those already open).
function M.setup()
  api.nvim_clear_autocmds({ group = group })
  api.nvim_create_autocmd("FileType", {
    group = group,
    callback = function(args)
      M.start(args.buf)
    end,
  })
  for _, buf in ipairs(api.nvim_list_bufs()) do
    if api.nvim_buf_is_loaded(buf) and M.wants(buf) then
      M.start(buf)
    end
  end
end

return M
