-- Inline completion with the plugin's own ghost text (Neovim < 0.12, or native = false):
-- debounced requests while typing, staleness tracking, candidates, accept / dismiss.
--
-- Per buffer, `gen` counts requests: every change, cursor move or dismissal bumps it, and a
-- reply is drawn only if its generation is still current and the buffer (changedtick) and
-- cursor are where the request was made. Cancelled requests are also cancelled on the server,
-- but Neovim drops their replies, so the generation is what keeps stale text off the screen.
local config = require("codellama.config")
local ghost = require("codellama.ghost")
local util = require("codellama.util")

local M = {}

local api = vim.api
local TRIGGER_INVOKED, TRIGGER_AUTOMATIC = 1, 2
local REQUEST_CANCELLED, CONTENT_MODIFIED = -32800, -32801

---@class codellama.Item
---@field text string insertText
---@field snippet boolean insertText was a snippet (inserted as plain text)
---@field range integer[] { start_row, start_col, end_row, end_col } in bytes
---@field command table? lsp.Command sent when accepted
---@field completion_id any? the server's id of the item, for codellama/didShowCompletion

---@class codellama.BufState
---@field gen integer
---@field tick integer changedtick last seen
---@field cursor integer[] { row, col } last seen
---@field timer userdata?
---@field request table? { client_id, id, gen }
---@field items codellama.Item[]?
---@field index integer
---@field item_gen integer? generation whose reply gave `items`
---@field end_offset integer[]? range end relative to the cursor of the request
---@field shown table<any, boolean> completion ids already reported as shown

---@type table<integer, codellama.BufState>
local buffers = {}

-- What happened, for tests and debugging: requests sent, candidates drawn, replies dropped.
M.log = { requests = {}, renders = {}, stale = 0, accepted = 0 }
local LOG_MAX = 1000

---@param list table[]
---@param entry table
local function append(list, entry)
  if #list >= LOG_MAX then
    for _ = 1, LOG_MAX / 2 do
      table.remove(list, 1)
    end
  end
  list[#list + 1] = entry
end

local function now_ms()
  return util.uv.hrtime() / 1e6
end

---@param bufnr integer
---@return codellama.BufState?
local function state(bufnr)
  return buffers[bufnr]
end

---@param bufnr integer
---@return table? client
function M.client(bufnr)
  return util.get_clients({ name = "codellama", bufnr = bufnr })[1]
end

local function stop_timer(s)
  if s.timer then
    s.timer:stop()
    s.timer:close()
    s.timer = nil
  end
end

local function cancel_request(s)
  local request = s.request
  s.request = nil
  if request then
    local client = vim.lsp.get_client_by_id(request.client_id)
    if client and not util.is_stopped(client) then
      util.cancel_request(client, request.id)
    end
  end
end

--- Forget the candidates and everything in flight; later replies become stale.
---@param bufnr integer
function M.reset(bufnr)
  local s = state(bufnr)
  if not s then
    return
  end
  s.gen = s.gen + 1
  stop_timer(s)
  cancel_request(s)
  s.items, s.item_gen, s.end_offset = nil, nil, nil
  s.index = 1
  ghost.clear(bufnr)
end

M.dismiss = M.reset

---@param bufnr integer
local function remember_position(bufnr)
  local s = buffers[bufnr]
  s.tick = api.nvim_buf_get_changedtick(bufnr)
  local row, col = util.cursor(bufnr)
  s.cursor = { row, col }
end

-- Items ------------------------------------------------------------------------------------

---@param client table
---@return string
local function encoding(client)
  return client.offset_encoding or "utf-16"
end

--- The server's id of an item: the first argument of its accept command, or a field of it.
---@param raw table lsp.InlineCompletionItem
---@return any
local function completion_id(raw)
  local args = raw.command and raw.command.arguments
  local first = type(args) == "table" and args[1] or nil
  if type(first) == "table" then
    return first.completionId or first.completion_id or first.id
  end
  if first ~= nil then
    return first
  end
  return type(raw.data) == "table" and raw.data.completionId or nil
end

---@param bufnr integer
---@param client table
---@param result table? lsp.InlineCompletionList | lsp.InlineCompletionItem[]
---@param row integer cursor of the request
---@param col integer
---@return codellama.Item[]
local function to_items(bufnr, client, result, row, col)
  local items = {}
  local raw_items = result and (result.items or result) or {}
  for _, raw in ipairs(raw_items) do
    local text, snippet = raw.insertText, false
    if type(text) == "table" then
      text, snippet = text.value, true
    end
    if type(text) == "string" then
      local range = { row, col, row, col }
      if type(raw.range) == "table" then
        local sr, sc = util.from_lsp_position(bufnr, raw.range.start, encoding(client))
        local er, ec = util.from_lsp_position(bufnr, raw.range["end"], encoding(client))
        range = { sr, sc, er, ec }
      end
      items[#items + 1] = {
        text = text,
        snippet = snippet,
        range = range,
        command = raw.command,
        completion_id = completion_id(raw),
      }
    end
  end
  return items
end

--- Where the current item's range ends now: the text after the cursor stays where it was
--- relative to the cursor while the user types before it.
---@param s codellama.BufState
---@param row integer
---@param col integer
---@return integer, integer
local function range_end(s, row, col)
  local off = s.end_offset
  if not off then
    return row, col
  end
  if off[1] == 0 then
    return row, col + off[2]
  end
  return row + off[1], off[2]
end

---@class codellama.Remainder
---@field text string what is left to insert at the cursor
---@field replaced string buffer text from the cursor to the range end (replaced on accept)

--- The part of an item that the user has not typed yet, or nil when the buffer no longer
--- agrees with it.
---@param bufnr integer
---@param s codellama.BufState
---@param item codellama.Item
---@return codellama.Remainder?
local function remainder(bufnr, s, item)
  local row, col = util.cursor(bufnr)
  local sr, sc = item.range[1], item.range[2]
  if sr > row or (sr == row and sc > col) then
    return nil
  end
  local ok, typed_lines = pcall(api.nvim_buf_get_text, bufnr, sr, sc, row, col, {})
  if not ok then
    return nil
  end
  local typed = table.concat(typed_lines, "\n")
  if item.text:sub(1, #typed) ~= typed then
    return nil
  end
  local er, ec = range_end(s, row, col)
  local replaced = ""
  if er > row or (er == row and ec > col) then
    local ok_r, lines = pcall(api.nvim_buf_get_text, bufnr, row, col, er, ec, {})
    replaced = ok_r and table.concat(lines, "\n") or ""
  end
  return { text = item.text:sub(#typed + 1), replaced = replaced }
end

---@param rest codellama.Remainder
---@return string[]
local function display_lines(rest)
  local text = rest.text
  -- Text after the cursor that the item rewrites identically ("foo)" over ")") stays visible
  -- as it is: draw only what comes before it.
  if rest.replaced ~= "" and not rest.replaced:find("\n") and text:sub(-#rest.replaced) == rest.replaced then
    text = text:sub(1, #text - #rest.replaced)
  end
  return util.split_lines(text)
end

-- Drawing ----------------------------------------------------------------------------------

---@param bufnr integer
---@return boolean drawn
local function render(bufnr)
  local s = state(bufnr)
  if not (s and s.items and s.items[s.index]) then
    return false
  end
  ghost.clear(bufnr)
  if vim.fn.pumvisible() == 1 then
    return false
  end
  local item = s.items[s.index]
  local rest = remainder(bufnr, s, item)
  if not rest or rest.text == "" then
    return false
  end
  local row, col = util.cursor(bufnr)
  ghost.show(bufnr, { row = row, col = col, lines = display_lines(rest) }, config.options.ghost_text.hl_group)
  append(M.log.renders, { gen = s.item_gen, index = s.index, text = rest.text, row = row, col = col })
  local id = item.completion_id
  local client = M.client(bufnr)
  if id ~= nil and not s.shown[id] and client then
    s.shown[id] = true
    util.notify_server(client, "codellama/didShowCompletion", { uri = vim.uri_from_bufnr(bufnr), completionId = id })
  end
  api.nvim_exec_autocmds("User", { pattern = "CodellamaGhostShown", modeline = false })
  return true
end

-- Requests ---------------------------------------------------------------------------------

---@param bufnr integer
---@param trigger_kind integer
function M.request(bufnr, trigger_kind)
  local s = state(bufnr)
  local client = M.client(bufnr)
  if not (s and client) then
    return
  end
  stop_timer(s)
  cancel_request(s)
  s.gen = s.gen + 1
  local gen = s.gen
  remember_position(bufnr)
  local tick, row, col = s.tick, s.cursor[1], s.cursor[2]
  local params = {
    textDocument = { uri = vim.uri_from_bufnr(bufnr) },
    position = util.to_lsp_position(bufnr, row, col, encoding(client)),
    context = { triggerKind = trigger_kind },
  }
  local sent_at = now_ms()
  local entry = { gen = gen, row = row, col = col, trigger = trigger_kind }
  local ok, id = util.request(client, "textDocument/inlineCompletion", params, function(err, result)
    entry.reply_ms = now_ms() - sent_at
    if s.request and s.request.gen == gen then
      s.request = nil
    end
    local row_now, col_now = util.cursor(bufnr)
    local current = s.gen == gen
      and api.nvim_buf_is_valid(bufnr)
      and api.nvim_buf_get_changedtick(bufnr) == tick
      and row_now == row
      and col_now == col
      and util.in_insert_mode()
    if not current then
      M.log.stale = M.log.stale + 1
      entry.stale = true
      return
    end
    if err then
      if err.code ~= REQUEST_CANCELLED and err.code ~= CONTENT_MODIFIED then
        util.warn("completion failed: " .. tostring(err.message))
      end
      return
    end
    local items = to_items(bufnr, client, result, row, col)
    entry.items = #items
    if #items == 0 then
      return
    end
    s.items, s.index, s.item_gen = items, 1, gen
    local er, ec = items[1].range[3], items[1].range[4]
    s.end_offset = er == row and { 0, math.max(ec - col, 0) } or { er - row, ec }
    render(bufnr)
  end, bufnr)
  if ok and id then
    entry.id = id
    s.request = { client_id = client.id, id = id, gen = gen }
    append(M.log.requests, entry)
  end
end

---@param bufnr integer
local function schedule_request(bufnr)
  local s = state(bufnr)
  local opts = config.options.ghost_text
  if not (s and opts.enabled and opts.auto_trigger and M.enabled) then
    return
  end
  local gen = s.gen
  s.timer = util.uv.new_timer()
  s.timer:start(
    opts.debounce_ms,
    0,
    vim.schedule_wrap(function()
      if s.gen ~= gen or not api.nvim_buf_is_valid(bufnr) then
        return
      end
      stop_timer(s)
      if util.in_insert_mode() and api.nvim_get_current_buf() == bufnr then
        M.request(bufnr, TRIGGER_AUTOMATIC)
      end
    end)
  )
end

-- Events -----------------------------------------------------------------------------------

--- Text changed in Insert mode: keep the candidate when the user typed along with it,
--- else forget it and ask again after the debounce.
---@param bufnr integer
function M.on_text_changed(bufnr)
  local s = state(bufnr)
  if not s or api.nvim_buf_get_changedtick(bufnr) == s.tick then
    return
  end
  remember_position(bufnr)
  if s.items and render(bufnr) then
    return
  end
  M.reset(bufnr)
  schedule_request(bufnr)
end

--- The cursor moved: without a change of text that dismisses the candidate.
---@param bufnr integer
function M.on_cursor_moved(bufnr)
  local s = state(bufnr)
  if not s or api.nvim_buf_get_changedtick(bufnr) ~= s.tick then
    return -- a text change: on_text_changed decides
  end
  local row, col = util.cursor(bufnr)
  if s.cursor[1] == row and s.cursor[2] == col then
    return
  end
  s.cursor = { row, col }
  M.reset(bufnr)
end

-- Accepting --------------------------------------------------------------------------------

---@param bufnr integer
---@return codellama.Item?, codellama.Remainder?
local function current(bufnr)
  local s = state(bufnr)
  if not (s and s.items and s.items[s.index]) or #ghost.marks(bufnr) == 0 then
    return nil
  end
  local item = s.items[s.index]
  local rest = remainder(bufnr, s, item)
  if not rest or rest.text == "" then
    return nil
  end
  return item, rest
end

--- Whether a candidate is shown in the buffer.
---@param bufnr? integer
---@return boolean
function M.visible(bufnr)
  return current(bufnr or api.nvim_get_current_buf()) ~= nil
end

---@param bufnr integer
---@param item codellama.Item
local function send_accepted(bufnr, item)
  M.log.accepted = M.log.accepted + 1
  local client = M.client(bufnr)
  if not (client and item.command) then
    return
  end
  local params = { command = item.command.command, arguments = item.command.arguments }
  util.request(client, "workspace/executeCommand", params, function() end, bufnr)
end

--- Insert the whole candidate (replacing its range), move the cursor after it.
---@param bufnr? integer
---@return boolean accepted
function M.accept(bufnr)
  bufnr = bufnr or api.nvim_get_current_buf()
  local item = current(bufnr)
  if not item then
    return false
  end
  local s = buffers[bufnr]
  local row, col = util.cursor(bufnr)
  local er, ec = range_end(s, row, col)
  if er < row or (er == row and ec < col) then
    er, ec = row, col
  end
  local lines = util.split_lines(item.text)
  local sr, sc = item.range[1], item.range[2]
  M.reset(bufnr)
  api.nvim_buf_set_text(bufnr, sr, sc, er, ec, lines)
  local end_row, end_col = util.end_of(sr, sc, lines)
  api.nvim_win_set_cursor(0, { end_row + 1, end_col })
  send_accepted(bufnr, item)
  return true
end

--- The next word of a text: leading blanks and one run of word or of other characters, or a
--- line break.
---@param text string
---@return string
function M.next_word(text)
  if text:sub(1, 1) == "\n" then
    return "\n" .. (text:match("^\n[ \t]*") or "\n"):sub(2)
  end
  return text:match("^[ \t]*[%w_]+") or text:match("^[ \t]*[^%w_%s]+") or text:match("^[ \t]+") or text:sub(1, 1)
end

--- The rest of the current line of a text, or the line break and the next line when the
--- current line is done.
---@param text string
---@return string
function M.next_line(text)
  local line = text:match("^[^\n]*")
  if line ~= "" then
    return line
  end
  return text:match("^\n[^\n]*") or text
end

---@param bufnr integer
---@param pick fun(text: string): string
---@return boolean
local function accept_part(bufnr, pick)
  local item, rest = current(bufnr)
  if not (item and rest) then
    return false
  end
  local part = pick(rest.text)
  if part == rest.text then
    return M.accept(bufnr)
  end
  local row, col = util.cursor(bufnr)
  local lines = util.split_lines(part)
  api.nvim_buf_set_text(bufnr, row, col, row, col, lines)
  local end_row, end_col = util.end_of(row, col, lines)
  api.nvim_win_set_cursor(0, { end_row + 1, end_col })
  -- The rest stays on screen: the candidate still agrees with the buffer.
  remember_position(bufnr)
  render(bufnr)
  return true
end

---@param bufnr? integer
---@return boolean
function M.accept_word(bufnr)
  return accept_part(bufnr or api.nvim_get_current_buf(), M.next_word)
end

---@param bufnr? integer
---@return boolean
function M.accept_line(bufnr)
  return accept_part(bufnr or api.nvim_get_current_buf(), M.next_line)
end

--- Show the next (count 1) or previous (count -1) candidate; without one, ask for candidates.
---@param count integer
---@param bufnr? integer
function M.cycle(count, bufnr)
  bufnr = bufnr or api.nvim_get_current_buf()
  local s = state(bufnr)
  if not s then
    return
  end
  if not (s.items and #ghost.marks(bufnr) > 0) then
    M.request(bufnr, TRIGGER_INVOKED)
    return
  end
  s.index = (s.index - 1 + count) % #s.items + 1
  render(bufnr)
end

--- Ask for candidates now (an invoked request: several samples where the server allows).
---@param bufnr? integer
function M.suggest(bufnr)
  M.request(bufnr or api.nvim_get_current_buf(), TRIGGER_INVOKED)
end

-- Buffers ----------------------------------------------------------------------------------

M.enabled = true

local group = api.nvim_create_augroup("codellama.completion", { clear = true })

---@param bufnr integer
function M.attach(bufnr)
  if buffers[bufnr] then
    return
  end
  buffers[bufnr] = { gen = 0, tick = -1, cursor = { -1, -1 }, index = 1, shown = {} }
  local function on(events, fn)
    api.nvim_create_autocmd(events, {
      group = group,
      buffer = bufnr,
      callback = function()
        fn(bufnr)
      end,
    })
  end
  on({ "TextChangedI", "TextChangedP" }, M.on_text_changed)
  on("CursorMovedI", M.on_cursor_moved)
  on({ "InsertLeave", "BufLeave" }, M.reset)
  on("InsertEnter", remember_position)
  -- The completion menu covers ghost text: hide it while the menu is open, redraw after.
  on("CompleteChanged", ghost.clear)
  on("CompleteDone", function()
    vim.schedule(function()
      if buffers[bufnr] and api.nvim_buf_is_valid(bufnr) then
        render(bufnr)
      end
    end)
  end)
  on({ "BufUnload", "BufWipeout" }, M.detach)
end

---@param bufnr integer
function M.detach(bufnr)
  if not buffers[bufnr] then
    return
  end
  M.reset(bufnr)
  buffers[bufnr] = nil
  api.nvim_clear_autocmds({ group = group, buffer = bufnr })
end

---@param bufnr integer
---@return boolean
function M.attached(bufnr)
  return buffers[bufnr] ~= nil
end

--- Debug view of a buffer's state (tests, :Codellama stats).
---@param bufnr? integer
---@return table
function M.inspect(bufnr)
  bufnr = bufnr or api.nvim_get_current_buf()
  local s = state(bufnr)
  if not s then
    return { attached = false }
  end
  return {
    attached = true,
    gen = s.gen,
    in_flight = s.request ~= nil,
    items = s.items and vim.tbl_map(function(item)
      return item.text
    end, s.items) or {},
    index = s.index,
    marks = ghost.marks(bufnr),
  }
end

return M
