-- Ghost text: drawing a candidate as virtual text at the cursor, and nothing else.
-- Inline virtual text (0.10+) shows the first line where it will go; before 0.10 it overlays
-- the end of the line, or follows it when text stands after the cursor. Further lines are
-- virtual lines below.
local util = require("codellama.util")

local M = {}

M.ns = vim.api.nvim_create_namespace("codellama.ghost")

local has_inline = util.has("0.10")

---@class codellama.GhostView
---@field row integer 0-based
---@field col integer byte column
---@field lines string[] what to draw: the first on the cursor line, the rest below

---@param bufnr integer
---@param view codellama.GhostView
---@param hl_group string
---@return integer extmark id
function M.show(bufnr, view, hl_group)
  M.clear(bufnr)
  local opts = { hl_mode = "combine", priority = 4096 }
  local first = view.lines[1] or ""
  if first ~= "" then
    opts.virt_text = { { first, hl_group } }
    if has_inline then
      opts.virt_text_pos = "inline"
    else
      local line = util.line(bufnr, view.row)
      opts.virt_text_pos = view.col >= #line and "overlay" or "eol"
    end
  end
  if #view.lines > 1 then
    opts.virt_lines = {}
    for i = 2, #view.lines do
      opts.virt_lines[#opts.virt_lines + 1] = { { view.lines[i], hl_group } }
    end
  end
  return vim.api.nvim_buf_set_extmark(bufnr, M.ns, view.row, view.col, opts)
end

---@param bufnr integer
function M.clear(bufnr)
  if vim.api.nvim_buf_is_valid(bufnr) then
    vim.api.nvim_buf_clear_namespace(bufnr, M.ns, 0, -1)
  end
end

--- The extmarks drawn in a buffer (for tests and statuslines).
---@param bufnr integer
---@return table[] { row, col, text, lines }
function M.marks(bufnr)
  local out = {}
  for _, mark in ipairs(vim.api.nvim_buf_get_extmarks(bufnr, M.ns, 0, -1, { details = true })) do
    local details = mark[4]
    local lines = { details.virt_text and details.virt_text[1][1] or "" }
    for _, virt_line in ipairs(details.virt_lines or {}) do
      lines[#lines + 1] = virt_line[1] and virt_line[1][1] or ""
    end
    out[#out + 1] = { row = mark[2], col = mark[3], text = table.concat(lines, "\n"), lines = lines }
  end
  return out
end

return M
