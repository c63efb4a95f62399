-- :Codellama {subcommand}. Nothing starts until require("codellama").setup() is called.
if vim.g.loaded_codellama or vim.fn.has("nvim-0.9") == 0 then
  return
end
vim.g.loaded_codellama = true

local function codellama()
  return require("codellama")
end

local function show_stats()
  local util = require("codellama.util")
  local client = require("codellama.lsp").client()
  if not client then
    util.warn("the server is not running")
    return
  end
  util.request(client, "codellama/stats", vim.empty_dict(), function(err, result)
    if err then
      util.error("codellama/stats failed: " .. tostring(err.message))
      return
    end
    local lines = vim.split(vim.inspect(result), "\n", { plain = true })
    vim.lsp.util.open_floating_preview(lines, "lua", { border = "rounded", focus_id = "codellama.stats" })
  end, 0)
end

---@type table<string, fun(args: table)>
local subcommands = {
  status = function()
    local text = codellama().status()
    require("codellama.util").notify(text ~= "" and text or "Code Llama: stopped")
  end,
  restart = function()
    codellama().restart()
  end,
  stop = function()
    codellama().stop()
  end,
  toggle = function()
    codellama().toggle()
  end,
  suggest = function()
    codellama().suggest()
  end,
  actions = function()
    codellama().code_action()
  end,
  explain = function(args)
    codellama().action("explain", args.line1, args.line2)
  end,
  refactor = function(args)
    local instruction = table.concat(vim.list_slice(args.fargs, 2), " ")
    codellama().action("refactor", args.line1, args.line2, instruction ~= "" and instruction or nil)
  end,
  docstring = function(args)
    codellama().action("docstring", args.line1, args.line2)
  end,
  tests = function(args)
    codellama().action("tests", args.line1, args.line2)
  end,
  stats = show_stats,
}

vim.api.nvim_create_user_command("Codellama", function(args)
  local name = args.fargs[1] or "status"
  local run = subcommands[name]
  if not run then
    require("codellama.util").warn("unknown subcommand " .. name)
    return
  end
  run(args)
end, {
  nargs = "*",
  range = true,
  desc = "Code Llama: status, restart, stop, toggle, suggest, actions, explain, refactor, docstring, tests, stats",
  complete = function(arg_lead, line)
    if line:match("^%S*%s+%S*$") == nil then
      return {}
    end
    local names = vim.tbl_keys(subcommands)
    table.sort(names)
    return vim.tbl_filter(function(name)
      return name:find(arg_lead, 1, true) == 1
    end, names)
  end,
})
