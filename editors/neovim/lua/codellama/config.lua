-- The plugin's options: defaults, validation (a bad value is reported and replaced by its
-- default, never fatal), and the server settings sent as initializationOptions.
local util = require("codellama.util")

local M = {}

---@class codellama.Config
M.defaults = {
  -- The server command. nil: `codellama-lsp serve` when that is on $PATH, else
  -- `<python> -m codellama_lsp serve`; `--ckpt-dir` etc. are added from the options below.
  cmd = nil,
  -- Python interpreter of the server (the default command, :checkhealth). nil: python3.
  python = nil,
  -- Shortcuts for the server settings model.ckptDir, actions.instructCkptDir, model.device
  -- and model.nproc.
  ckpt_dir = nil,
  instruct_ckpt_dir = nil,
  device = nil,
  nproc = nil,
  -- File types to attach to; empty: every buffer with a file type.
  filetypes = {},
  -- Files or folders that mark a project root (the server's workspace folder).
  root_markers = { ".git" },
  -- Extra environment for the server process.
  cmd_env = {},
  -- Server settings (initializationOptions and workspace/didChangeConfiguration), in the
  -- server's schema: { model = {...}, completion = {...}, actions = {...}, server = {...} }.
  settings = {},
  ghost_text = {
    enabled = true,
    -- Request completions while typing in Insert mode (else only with suggest / next).
    auto_trigger = true,
    -- Wait this long after the last change before asking the server.
    debounce_ms = 150,
    hl_group = "CodellamaGhostText",
    -- Use Neovim's own vim.lsp.inline_completion (0.12+): "auto" (when present), true, false.
    native = "auto",
  },
  -- Insert-mode keys; false disables one. Keys fall through to their usual meaning when no
  -- ghost text is shown.
  keymaps = {
    accept = "<Tab>",
    accept_word = "<M-w>",
    accept_line = "<M-l>",
    next = "<M-]>",
    prev = "<M-[>",
    dismiss = "<C-]>",
  },
  explain = {
    border = "rounded",
    max_width = 100,
    max_height = 40,
  },
  health = {
    -- How long :checkhealth lets the configured Python import torch.
    timeout_ms = 20000,
  },
}

---@alias codellama.Check fun(value: any): boolean, string?

---@param name string
---@return codellama.Check
local function is(name)
  return function(value)
    return type(value) == name, "a " .. name
  end
end

---@param check codellama.Check
---@return codellama.Check
local function optional(check)
  return function(value)
    if value == nil then
      return true
    end
    local ok, expected = check(value)
    return ok, (expected or "") .. " or nil"
  end
end

local function integer(min)
  return function(value)
    local ok = type(value) == "number" and value == math.floor(value) and value >= min
    return ok, ("an integer >= %d"):format(min)
  end
end

local function one_of(...)
  local options = { ... }
  return function(value)
    return vim.tbl_contains(options, value), "one of " .. vim.inspect(options)
  end
end

local function string_list(value)
  if type(value) ~= "table" then
    return false, "a list of strings"
  end
  for _, item in ipairs(value) do
    if type(item) ~= "string" then
      return false, "a list of strings"
    end
  end
  return true
end

local function command(value)
  if type(value) == "string" and value ~= "" then
    return true
  end
  local ok = string_list(value)
  return ok and #value > 0, "a non-empty list of strings (or a string)"
end

local function key_or_false(value)
  return value == false or (type(value) == "string" and value ~= ""), "a key (string) or false"
end

local function path_like(value)
  return type(value) == "string" and value ~= "", "a path (string)"
end

-- One check per option; a table of checks for a section.
local schema = {
  cmd = optional(command),
  python = optional(path_like),
  ckpt_dir = optional(path_like),
  instruct_ckpt_dir = optional(path_like),
  device = optional(one_of("cpu", "cuda", "auto")),
  nproc = optional(integer(1)),
  filetypes = string_list,
  root_markers = string_list,
  cmd_env = is("table"),
  settings = is("table"),
  ghost_text = {
    enabled = is("boolean"),
    auto_trigger = is("boolean"),
    debounce_ms = integer(0),
    hl_group = path_like,
    native = one_of("auto", true, false),
  },
  keymaps = {
    accept = key_or_false,
    accept_word = key_or_false,
    accept_line = key_or_false,
    next = key_or_false,
    prev = key_or_false,
    dismiss = key_or_false,
  },
  explain = {
    border = function(value)
      return type(value) == "string" or type(value) == "table", "a border name or list"
    end,
    max_width = integer(10),
    max_height = integer(3),
  },
  health = {
    timeout_ms = integer(100),
  },
}

---@param checks table
---@param defaults table
---@param user table
---@param prefix string
---@param problems string[]
---@return table
local function validate(checks, defaults, user, prefix, problems)
  local out = vim.deepcopy(defaults)
  for key, value in pairs(user) do
    local check = checks[key]
    local name = prefix .. tostring(key)
    if check == nil then
      problems[#problems + 1] = ("unknown option %s, ignored"):format(name)
    elseif type(check) == "table" then
      if type(value) == "table" then
        out[key] = validate(check, defaults[key], value, name .. ".", problems)
      else
        problems[#problems + 1] = ("option %s: expected a table, got %s; using the defaults"):format(
          name,
          vim.inspect(value)
        )
      end
    else
      local ok, expected = check(value)
      if ok then
        out[key] = value
      else
        problems[#problems + 1] = ("option %s: expected %s, got %s; using %s"):format(
          name,
          expected,
          vim.inspect(value),
          vim.inspect(defaults[key])
        )
      end
    end
  end
  return out
end

--- Validate user options against the defaults. Never raises.
---@param user table?
---@return codellama.Config config, string[] problems
function M.build(user)
  local problems = {}
  if user ~= nil and type(user) ~= "table" then
    problems[1] = ("setup() expects a table, got %s; using the defaults"):format(vim.inspect(user))
    user = {}
  end
  return validate(schema, M.defaults, user or {}, "", problems), problems
end

---@type codellama.Config
M.options = vim.deepcopy(M.defaults)

--- Validate, report problems with vim.notify, and make the result current.
---@param user table?
---@return codellama.Config
function M.setup(user)
  local options, problems = M.build(user)
  for _, problem in ipairs(problems) do
    util.warn(problem)
  end
  M.options = options
  return options
end

--- The server settings (wire contract: initializationOptions / didChangeConfiguration), with the
--- shortcuts folded in.
---@param options? codellama.Config
---@return table
function M.server_settings(options)
  options = options or M.options
  local settings = vim.deepcopy(options.settings)
  local function put(section, key, value)
    if value ~= nil then
      settings[section] = settings[section] or {}
      if settings[section][key] == nil then
        settings[section][key] = value
      end
    end
  end
  put("model", "ckptDir", options.ckpt_dir and vim.fn.expand(options.ckpt_dir))
  put("model", "device", options.device)
  put("model", "nproc", options.nproc)
  put("actions", "instructCkptDir", options.instruct_ckpt_dir and vim.fn.expand(options.instruct_ckpt_dir))
  put("completion", "debounceMs", options.ghost_text.debounce_ms)
  return settings
end

---@param options? codellama.Config
---@return string
function M.python(options)
  options = options or M.options
  return options.python and vim.fn.expand(options.python) or "python3"
end

--- The server command line.
---@param options? codellama.Config
---@return string[]
function M.cmd(options)
  options = options or M.options
  if type(options.cmd) == "string" then
    return vim.split(options.cmd, "%s+", { trimempty = true })
  elseif options.cmd then
    return vim.deepcopy(options.cmd)
  end
  local cmd
  if vim.fn.executable("codellama-lsp") == 1 then
    cmd = { "codellama-lsp", "serve" }
  else
    cmd = { M.python(options), "-m", "codellama_lsp", "serve" }
  end
  if options.ckpt_dir then
    vim.list_extend(cmd, { "--ckpt-dir", vim.fn.expand(options.ckpt_dir) })
  end
  return cmd
end

--- The checkpoint folder the server will load, for :checkhealth.
---@param options? codellama.Config
---@return string?
function M.ckpt_dir(options)
  options = options or M.options
  local model = options.settings.model or {}
  local dir = model.ckptDir or model.ckpt_dir or options.ckpt_dir
  if not dir then
    local cmd = M.cmd(options)
    for i, arg in ipairs(cmd) do
      if arg == "--ckpt-dir" then
        dir = cmd[i + 1]
      end
    end
  end
  return dir and vim.fn.expand(dir) or nil
end

return M
