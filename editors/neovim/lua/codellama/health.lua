-- :checkhealth codellama — the server command, its Python and torch, GPU visibility, the
-- checkpoint folders and the running server.
local config = require("codellama.config")

local M = {}

local health = vim.health
local start = health.start or health.report_start
local ok = health.ok or health.report_ok
local warn = health.warn or health.report_warn
local error = health.error or health.report_error
local info = health.info or health.report_info

--- Run a command with a time limit.
---@param cmd string[]
---@param timeout_ms integer
---@return integer? code (nil: timed out or could not start), string stdout, string stderr
function M.run(cmd, timeout_ms)
  if vim.system then
    local okay, proc = pcall(vim.system, cmd, { text = true, timeout = timeout_ms })
    if not okay then
      return nil, "", tostring(proc)
    end
    local result = proc:wait()
    if result.code == 124 then
      return nil, result.stdout or "", "timed out"
    end
    return result.code, result.stdout or "", result.stderr or ""
  end
  local out, err = {}, {}
  local job = vim.fn.jobstart(cmd, {
    stdout_buffered = true,
    stderr_buffered = true,
    on_stdout = function(_, data)
      out = data
    end,
    on_stderr = function(_, data)
      err = data
    end,
  })
  if job <= 0 then
    return nil, "", "could not start " .. cmd[1]
  end
  local code = vim.fn.jobwait({ job }, timeout_ms)[1]
  if code == -1 then
    vim.fn.jobstop(job)
    return nil, "", "timed out"
  end
  return code, table.concat(out, "\n"), table.concat(err, "\n")
end

--- The Python that runs the server: the interpreter named in the command, the one in the
--- `codellama-lsp` script's #! line, or the `python` option.
---@param cmd string[]
---@return string
function M.server_python(cmd)
  local program = vim.fs.basename(cmd[1] or "")
  if program:match("^python") then
    return cmd[1]
  end
  local path = vim.fn.exepath(cmd[1] or "")
  if path ~= "" and vim.fn.filereadable(path) == 1 then
    local first = vim.fn.readfile(path, "", 1)[1] or ""
    local shebang = first:match("^#!%s*(%S+python[%w%.]*)%s*$")
    if shebang then
      return shebang
    end
  end
  return config.python()
end

local PROBE = [[
import json, sys
out = {"python": sys.version.split()[0]}
try:
    import torch
    out["torch"] = torch.__version__
    out["cuda"] = bool(torch.cuda.is_available())
    out["devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
except Exception as exc:
    out["torch_error"] = repr(exc)
try:
    import codellama_lsp
    out["codellama_lsp"] = getattr(codellama_lsp, "__version__", "installed")
except Exception as exc:
    out["codellama_lsp_error"] = repr(exc)
print(json.dumps(out))
]]

---@param python string
local function check_python(python)
  start("codellama: Python and torch")
  if vim.fn.executable(python) ~= 1 then
    error(("Python not found: %s"):format(python), { "Set the `python` option or `cmd`." })
    return
  end
  info("Python: " .. vim.fn.exepath(python))
  local timeout = config.options.health.timeout_ms
  local code, stdout, stderr = M.run({ python, "-c", PROBE }, timeout)
  if code == nil then
    warn(("probing Python took longer than %d ms: %s"):format(timeout, stderr))
    return
  end
  local decoded, probe = pcall(vim.json.decode, vim.trim(stdout))
  if code ~= 0 or not decoded or type(probe) ~= "table" then
    error("Python failed: " .. vim.trim(stderr ~= "" and stderr or stdout))
    return
  end
  ok("Python " .. probe.python)
  if probe.codellama_lsp then
    ok("codellama_lsp importable (" .. tostring(probe.codellama_lsp) .. ")")
  else
    warn("codellama_lsp is not importable: " .. tostring(probe.codellama_lsp_error), {
      "Install the server into this Python: python -m pip install codellama-lsp (or -e the repo).",
    })
  end
  if not probe.torch then
    error("torch is not importable: " .. tostring(probe.torch_error))
    return
  end
  ok("torch " .. probe.torch)
  if probe.cuda then
    ok("GPU visible: " .. table.concat(probe.devices or {}, ", "))
  else
    info("no GPU visible to torch (torch.cuda.is_available() is false): the server runs on the CPU")
  end
end

--- Checkpoint layout: Meta's (params.json, consolidated.*.pth, tokenizer.model) or Hugging
--- Face's (config.json, *.safetensors).
---@param label string
---@param dir string?
---@param tokenizer string?
local function check_checkpoint(label, dir, tokenizer)
  if not dir then
    info(label .. ": not set")
    return
  end
  if vim.fn.isdirectory(dir) ~= 1 then
    error(("%s: %s is not a folder"):format(label, dir))
    return
  end
  local function has(name)
    return vim.fn.filereadable(dir .. "/" .. name) == 1
  end
  local shards = vim.fn.glob(dir .. "/consolidated.*.pth", false, true)
  local safetensors = vim.fn.glob(dir .. "/*.safetensors", false, true)
  tokenizer = tokenizer or (dir .. "/tokenizer.model")
  local problems = {}
  if #shards > 0 or has("params.json") then
    if not has("params.json") then
      problems[#problems + 1] = "params.json missing"
    end
    if #shards == 0 then
      problems[#problems + 1] = "no consolidated.*.pth shard"
    end
  elseif #safetensors > 0 or has("config.json") then
    if #safetensors == 0 then
      problems[#problems + 1] = "no *.safetensors file"
    end
  else
    problems[#problems + 1] = "neither params.json + consolidated.*.pth nor config.json + *.safetensors"
  end
  if vim.fn.filereadable(tokenizer) ~= 1 then
    problems[#problems + 1] = "tokenizer missing: " .. tokenizer
  end
  if #problems == 0 then
    local shape = #shards > 0 and ("%d shard(s)"):format(#shards) or ("%d safetensors file(s)"):format(#safetensors)
    ok(("%s: %s (%s, tokenizer.model)"):format(label, dir, shape))
  else
    error(("%s: %s: %s"):format(label, dir, table.concat(problems, "; ")))
  end
end

function M.check()
  start("codellama: Neovim")
  if vim.fn.has("nvim-0.9") == 1 then
    local v = vim.version()
    ok(("Neovim %d.%d.%d"):format(v.major, v.minor, v.patch))
  else
    error("Neovim 0.9 or newer is needed")
  end
  if require("codellama.lsp").native() then
    info("ghost text: Neovim's vim.lsp.inline_completion")
  else
    info("ghost text: the plugin's own (inline virtual text: " .. tostring(vim.fn.has("nvim-0.10") == 1) .. ")")
  end

  start("codellama: server command")
  local cmd = config.cmd()
  info("command: " .. table.concat(cmd, " "))
  local path = vim.fn.exepath(cmd[1])
  if path ~= "" then
    ok(("executable found: %s"):format(path))
  else
    error(("not executable or not on $PATH: %s"):format(cmd[1]), {
      "Install the server (python -m pip install codellama-lsp) or set `cmd` in setup().",
    })
  end

  check_python(M.server_python(cmd))

  start("codellama: checkpoints")
  local settings = config.server_settings()
  local model = settings.model or {}
  check_checkpoint("completion model", config.ckpt_dir(), model.tokenizerPath or model.tokenizer_path)
  local instruct = settings.actions and (settings.actions.instructCkptDir or settings.actions.instruct_ckpt_dir)
  check_checkpoint("Instruct model", instruct and vim.fn.expand(instruct) or nil)

  start("codellama: server")
  local client = require("codellama.lsp").client()
  if client then
    ok(("running (client id %d): %s"):format(client.id, require("codellama").status()))
  else
    info("not running (it starts with the first matching buffer after setup())")
  end
end

return M
