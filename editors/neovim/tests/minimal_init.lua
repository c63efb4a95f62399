-- A minimal init for headless tests: this plugin alone, options from $CODELLAMA_TEST_OPTS (JSON),
-- and every vim.notify message kept in _G.codellama_messages (not echoed: nothing may wait for a
-- key press in a headless editor).
local root = vim.fn.fnamemodify(debug.getinfo(1, "S").source:sub(2), ":p:h:h")
vim.opt.runtimepath:prepend(root)
vim.opt.swapfile = false
vim.opt.shortmess:append("I")

_G.codellama_messages = {}
vim.notify = function(msg, level)
  table.insert(_G.codellama_messages, { msg = msg, level = level })
end

local opts = os.getenv("CODELLAMA_TEST_OPTS")
if opts and opts ~= "" then
  require("codellama").setup(vim.json.decode(opts))
end
