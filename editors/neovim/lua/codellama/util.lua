-- Small helpers shared by the plugin's modules, and the differences between Neovim 0.9, 0.10,
-- 0.11 and 0.12 in one place.
local M = {}

M.uv = vim.uv or vim.loop

---@param version string e.g. "0.10"
---@return boolean
function M.has(version)
  return vim.fn.has("nvim-" .. version) == 1
end

---@param msg string
---@param level? integer a vim.log.levels value (default: INFO)
function M.notify(msg, level)
  vim.notify("[codellama] " .. msg, level or vim.log.levels.INFO)
end

---@param msg string
function M.warn(msg)
  M.notify(msg, vim.log.levels.WARN)
end

---@param msg string
function M.error(msg)
  M.notify(msg, vim.log.levels.ERROR)
end

-- Client methods are called with ':' from 0.11 on; the '.' form is deprecated there and is the
-- only form before it.
local colon_calls = M.has("0.11")

---@param client table a vim.lsp.Client
---@param method string LSP method
---@param params table?
---@param handler function?
---@param bufnr integer?
---@return boolean ok, integer? request_id
function M.request(client, method, params, handler, bufnr)
  if colon_calls then
    return client:request(method, params, handler, bufnr)
  end
  return client.request(method, params, handler, bufnr)
end

---@param client table
---@param method string
---@param params table?
---@return boolean
function M.notify_server(client, method, params)
  if colon_calls then
    return client:notify(method, params)
  end
  return client.notify(method, params)
end

---@param client table
---@param request_id integer
function M.cancel_request(client, request_id)
  if colon_calls then
    client:cancel_request(request_id)
  else
    client.cancel_request(request_id)
  end
end

---@param client table
---@return boolean
function M.is_stopped(client)
  if colon_calls then
    return client:is_stopped()
  end
  return client.is_stopped()
end

---@param filter table
---@return table[] clients
function M.get_clients(filter)
  if vim.lsp.get_clients then
    return vim.lsp.get_clients(filter)
  end
  return vim.lsp.get_active_clients(filter)
end

--- Byte column of an LSP `character` on a line of text.
---@param line string
---@param character integer
---@param encoding string "utf-8" | "utf-16" | "utf-32"
---@return integer
function M.byte_col(line, character, encoding)
  if encoding == "utf-8" or character <= 0 then
    return math.min(character, #line)
  end
  local ok, col
  if M.has("0.11") then
    ok, col = pcall(vim.str_byteindex, line, encoding, character, false)
  else
    ok, col = pcall(vim.str_byteindex, line, character, encoding == "utf-16")
  end
  return ok and col or #line
end

--- LSP `character` of a byte column on a line of text.
---@param line string
---@param col integer
---@param encoding string
---@return integer
function M.lsp_character(line, col, encoding)
  if encoding == "utf-8" then
    return col
  end
  col = math.min(col, #line)
  if M.has("0.11") then
    return vim.str_utfindex(line, encoding, col, false)
  end
  local utf32, utf16 = vim.str_utfindex(line, col)
  return encoding == "utf-16" and utf16 or utf32
end

---@param bufnr integer
---@param row integer 0-based
---@return string
function M.line(bufnr, row)
  return vim.api.nvim_buf_get_lines(bufnr, row, row + 1, false)[1] or ""
end

--- An LSP position as a 0-based (row, byte col) pair in a buffer.
---@param bufnr integer
---@param position table lsp.Position
---@param encoding string
---@return integer row, integer col
function M.from_lsp_position(bufnr, position, encoding)
  local row = position.line
  return row, M.byte_col(M.line(bufnr, row), position.character, encoding)
end

---@param bufnr integer
---@param row integer 0-based
---@param col integer byte column
---@param encoding string
---@return table lsp.Position
function M.to_lsp_position(bufnr, row, col, encoding)
  return { line = row, character = M.lsp_character(M.line(bufnr, row), col, encoding) }
end

--- The cursor of the window showing `bufnr` (the current window when it does), 0-based row.
---@param bufnr integer
---@return integer row, integer col
function M.cursor(bufnr)
  local win = vim.api.nvim_get_current_win()
  if vim.api.nvim_win_get_buf(win) ~= bufnr then
    win = vim.fn.bufwinid(bufnr)
  end
  if win == -1 then
    return 0, 0
  end
  local pos = vim.api.nvim_win_get_cursor(win)
  return pos[1] - 1, pos[2]
end

---@param mode? string
---@return boolean
function M.in_insert_mode(mode)
  mode = mode or vim.api.nvim_get_mode().mode
  return mode:sub(1, 1) == "i"
end

--- Split text into buffer lines (the form nvim_buf_set_text takes).
---@param text string
---@return string[]
function M.split_lines(text)
  return vim.split(text, "\n", { plain = true })
end

--- The position right after `lines` inserted at (row, col).
---@param row integer
---@param col integer
---@param lines string[]
---@return integer row, integer col
function M.end_of(row, col, lines)
  if #lines == 1 then
    return row, col + #lines[1]
  end
  return row + #lines - 1, #lines[#lines]
end

return M
