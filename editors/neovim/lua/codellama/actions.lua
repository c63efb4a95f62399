-- Code actions on Code Llama Instruct. The server offers them through textDocument/codeAction
-- (so vim.lsp.buf.code_action() lists them); this module handles what comes back: the Markdown
-- of Explain in a floating window, Refactor's instruction prompt, and direct commands.
local config = require("codellama.config")
local util = require("codellama.util")

local M = {}

local api = vim.api

M.COMMANDS = {
  explain = "codellama.explain",
  refactor = "codellama.refactor",
  docstring = "codellama.addDocstring",
  tests = "codellama.writeTests",
}

-- The last Explain text shown and its window (tests, re-focus).
M.last_explain = nil

--- Open Markdown in a floating window; `q` closes it, calling it again focuses it.
---@param markdown string
---@return integer bufnr, integer winnr
function M.show_markdown(markdown)
  local opts = config.options.explain
  local lines = util.split_lines(markdown)
  local bufnr, winnr = vim.lsp.util.open_floating_preview(lines, "markdown", {
    border = opts.border,
    max_width = opts.max_width,
    max_height = opts.max_height,
    focus_id = "codellama.explain",
    close_events = { "BufHidden", "InsertEnter" },
    title = " Code Llama ",
  })
  vim.keymap.set("n", "q", "<cmd>close<cr>", { buffer = bufnr, silent = true, nowait = true })
  M.last_explain = { text = markdown, bufnr = bufnr, winnr = winnr }
  return bufnr, winnr
end

--- The Markdown of a command result: `{ markdown = ... }`, MarkupContent or a string.
---@param result any
---@return string?
local function markdown_of(result)
  if type(result) == "string" then
    return result
  end
  if type(result) == "table" then
    local text = result.markdown or result.value
    return type(text) == "string" and text or nil
  end
  return nil
end

--- workspace/executeCommand results of the client (handler in the client config). Explain's
--- Markdown opens in a float; edits arrive separately as workspace/applyEdit, refusals as a
--- message from the server.
function M.on_command_result(err, result, ctx)
  local command = ctx and ctx.params and ctx.params.command or "command"
  if err then
    if err.code ~= -32800 then
      util.error(("%s failed: %s"):format(command, err.message))
    end
    return
  end
  local text = markdown_of(result)
  if command == M.COMMANDS.explain and text and text ~= "" then
    M.show_markdown(text)
  end
end

---@param client table
---@param command string
---@param arguments table
---@param bufnr integer
local function execute(client, command, arguments, bufnr)
  local params = { command = command, arguments = arguments }
  util.request(client, "workspace/executeCommand", params, function(err, result, ctx)
    ctx = ctx or {}
    ctx.params = ctx.params or params
    M.on_command_result(err, result, ctx)
  end, bufnr)
end

--- Client-side `codellama.refactor`: asks for the instruction when the action has none.
---@param command table lsp.Command
---@param ctx table { client_id, bufnr }
function M.refactor_command(command, ctx)
  local client = vim.lsp.get_client_by_id(ctx.client_id)
  if not client then
    return
  end
  local args = vim.deepcopy(command.arguments or {})
  if args[3] ~= nil and args[3] ~= "" then
    execute(client, command.command, args, ctx.bufnr)
    return
  end
  vim.ui.input({ prompt = "Refactor instruction: " }, function(input)
    if input == nil then
      return
    end
    if input ~= "" then
      args[3] = input
    end
    execute(client, command.command, args, ctx.bufnr)
  end)
end

--- An LSP range of lines (1-based, inclusive) of a buffer.
---@param bufnr integer
---@param line1 integer
---@param line2 integer
---@param encoding string
---@return table
function M.line_range(bufnr, line1, line2, encoding)
  local last = util.line(bufnr, line2 - 1)
  return {
    start = { line = line1 - 1, character = 0 },
    ["end"] = { line = line2 - 1, character = util.lsp_character(last, #last, encoding) },
  }
end

--- Run a code action command directly on lines of the current buffer.
---@param name string a key of M.COMMANDS
---@param line1? integer
---@param line2? integer
---@param instruction? string Refactor's instruction
function M.run(name, line1, line2, instruction)
  local bufnr = api.nvim_get_current_buf()
  local client = util.get_clients({ name = "codellama", bufnr = bufnr })[1]
  local command = M.COMMANDS[name]
  if not client then
    util.warn("the server is not attached to this buffer")
    return
  end
  if not command then
    util.warn("unknown action " .. tostring(name))
    return
  end
  local row = api.nvim_win_get_cursor(0)[1]
  line1, line2 = line1 or row, line2 or row
  local range = M.line_range(bufnr, line1, line2, client.offset_encoding or "utf-16")
  local args = { vim.uri_from_bufnr(bufnr), range }
  if name == "refactor" then
    M.refactor_command({ command = command, arguments = { args[1], args[2], instruction } }, {
      client_id = client.id,
      bufnr = bufnr,
    })
    return
  end
  execute(client, command, args, bufnr)
end

--- vim.lsp.buf.code_action() limited to this server's actions (the filter gets the client id
--- from 0.10 on; before, every client's actions are listed).
---@param opts? table passed on (e.g. { apply = true })
function M.code_action(opts)
  opts = opts or {}
  local filter = opts.filter
  opts = vim.tbl_extend("force", {}, opts, {
    filter = function(action, client_id)
      local client = client_id and vim.lsp.get_client_by_id(client_id)
      if client and client.name ~= "codellama" then
        return false
      end
      return filter == nil or filter(action, client_id)
    end,
  })
  vim.lsp.buf.code_action(opts)
end

return M
