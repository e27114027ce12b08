// Writes the tokenizer conformance corpus (JSONL, one {"text": ...} a line).
// Deterministic (seeded PRNG, no dependencies); the output is committed as
// tests/tokenizer/corpus.jsonl. Regenerate: node gen_corpus.js > ../corpus.jsonl
// For a larger one-off differential run: node gen_corpus.js SEED COUNT.
'use strict';

let seed = process.argv[2] ? Number(process.argv[2]) : 0x5ae70c;
const target = process.argv[3] ? Number(process.argv[3]) : 2400;
function rand() {  // mulberry32
  seed = (seed + 0x6d2b79f5) | 0;
  let t = seed;
  t = Math.imul(t ^ (t >>> 15), t | 1);
  t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
  return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
}
const pick = (a) => a[Math.floor(rand() * a.length)];
const int = (lo, hi) => lo + Math.floor(rand() * (hi - lo + 1));

const out = [];
const add = (s) => out.push(s);

const multilingual = [
  'The quick brown fox jumps over the lazy dog.',
  'Portez ce vieux whisky au juge blond qui fume. L\'été dernier, j\'ai visité Montréal.',
  'Zwölf Boxkämpfer jagen Viktor quer über den großen Sylter Deich. Straße, Maß, Fußgänger.',
  'El pingüino Wenceslao hizo kilómetros bajo exhaustiva lluvia y frío. ¿Qué tal? ¡Hola!',
  'Съешь же ещё этих мягких французских булок, да выпей чаю. Москва — столица России.',
  'Ξεσκεπάζω την ψυχοφθόρα βδελυγμία. Η Αθήνα είναι η πρωτεύουσα της Ελλάδας.',
  'نص حكيم له سر قاطع وذو شأن عظيم مكتوب على ثوب أخضر ومغلف بجلد أزرق. القاهرة ١٢٣٤٥',
  'דג סקרן שט בים מאוכזב ולפתע מצא חברה. ירושלים היא עיר עתיקה.',
  'ऋषियों को सताने वाले दुष्ट राक्षसों के राजा रावण का सर्वनाश करने वाले विष्णुवतार भगवान श्रीराम। २०२४',
  'আমি বাংলায় গান গাই। ঢাকা বাংলাদেশের রাজধানী।',
  'தமிழ் ஒரு பழமையான மொழி. சென்னை தமிழ்நாட்டின் தலைநகரம்.',
  'เป็นมนุษย์สุดประเสริฐเลิศคุณค่า กว่าบรรดาฝูงสัตว์เดรัจฉาน กรุงเทพมหานคร',
  '我能吞下玻璃而不伤身体。北京是中华人民共和国的首都。今天天气很好，我们去公园散步吧！',
  'いろはにほへと ちりぬるを わかよたれそ つねならむ。東京は日本の首都です。カタカナ、ひらがな。',
  '다람쥐 헌 쳇바퀴에 타고파. 서울은 대한민국의 수도입니다. 안녕하세요!',
  'Tiếng Việt có dấu: Hà Nội là thủ đô của Việt Nam. Người ta nói rằng…',
  'Pijamalı hasta yağız şoföre çabucak güvendi. İstanbul, Ankara, Iğdır.',
  'Pchnąć w tę łódź jeża lub ośm skrzyń fig. Kraków, Łódź, Gdańsk.',
  'ქართული ენა ძალიან ლამაზია. თბილისი საქართველოს დედაქალაქია.',
  'Հայերենը հնդեվրոպական լեզու է։ Երևանը Հայաստանի մայրաքաղաքն է։',
  'ሰማይ አይታረስ ንጉሥ አይከሰስ። አዲስ አበባ የኢትዮጵያ ዋና ከተማ ናት።',
  'Příliš žluťoučký kůň úpěl ďábelské ódy. Praha je hlavní město.',
  'Árvíztűrő tükörfúrógép. Budapest Magyarország fővárosa.',
  'Jeg kan spise glas, det gør ikke ondt på mig. Blåbærsyltetøy og æøå ÆØÅ.',
  'Ṱ̺̺̕o͞ ̷i̲̬͇̪͙n̝̗͕v̟̜̘̦͟o̶̙̰̠kè͚̮̺̪̹̱̤ ̖t̝͕̳̣̻̪͞h̼͓̲̦̳̘̲e͇̣̰̦̬͎ ̢̼̻̱̘h͚͎͙̜̣̲ͅi̦̲̣̰̤v̻͍e̺̭̳̪̰-m̢iͅn̖̺̞̲̯̰d̵̼̟͙̩̼̘̳ ̞̥̱̳̭r̛̗̘e͙p͠r̼̞̻̭̗e̺̠̣͟s̘͇̳͍̝͉e͉̥̯̞̲͚̬͜ǹ̬͎͎̟̖͇̤t͍̬̤͓̼̭͘ͅi̪̱n͠g̴͉ ͏͉ͅc̬̟h͡a̫̻̯͘o̫̟̖͍̙̝͉s̗̦̲.̨̹͈̣',
  'ᚠᛇᚻ᛫ᛒᛦᚦ᛫ᚠᚱᚩᚠᚢᚱ᛫ᚠᛁᚱᚪ᛫ᚷᛖᚻᚹᛦᛚᚳᚢᛗ',
  'Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor.',
  'Ελληνικά και English mixed with 中文 and русский текст в одной строке.',
  'ＦＵＬＬＷＩＤＴＨ　ｔｅｘｔ　１２３　！？',
  'ﬁnancial ﬂow — ligatures ﬀ ﬃ and Ⅻ Ⅳ roman numerals, ½ ¾ ⅞ fractions, x² y³ z⁴.',
  'Mongolian: ᠮᠣᠩᠭᠣᠯ ᠪᠢᠴᠢᠭ᠎ᠠ and ᠤᠯᠠᠭᠠᠨᠪᠠᠭᠠᠲᠤᠷ',
  'Cherokee ᏣᎳᎩ ᎦᏬᏂᎯᏍᏗ, Canadian syllabics ᓀᐦᐃᔭᐍᐏᐣ, Tifinagh ⵜⴰⵎⴰⵣⵉⵖⵜ.',
  'Math: ∀x∈ℝ, x²≥0; ∑ᵢ aᵢ = ∫₀¹ f(x) dx ≈ 3.14159… ≠ ∞ ⇒ ⊂ ⊃ ∪ ∩',
  'Currency: $100, €99.99, £5, ¥1000, ₹500, ₿0.001, ₩10000',
  'Gothic 𐌰𐌱𐌲, Linear B 𐀀𐀁, cuneiform 𒀀𒀁, math bold 𝐀𝐁𝐂 𝟏𝟐𝟑',
];
multilingual.forEach(add);

const code = [
  '#include <iostream>\nint main() {\n    std::cout << "Hello, world!" << std::endl;\n    return 0;\n}\n',
  'def fib(n):\n    """Return the n-th Fibonacci number."""\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n',
  'const f = async (x) => { await sleep(100); return x?.y ?? [1, 2, 3].map(v => v ** 2); };',
  '{"key": "value", "n": 12345, "list": [1.5, -2e10, null, true], "nested": {"a": {}}}',
  '<!DOCTYPE html>\n<html lang="en">\n<head><meta charset="utf-8"><title>T</title></head>\n<body><p class="x">Hi &amp; bye</p></body>\n</html>',
  'for f in *.txt; do\n\tgrep -n "TODO" "$f" | awk -F: \'{print $1}\' >> out.log 2>&1\ndone',
  'SELECT u.id, COUNT(*) AS n FROM users u JOIN orders o ON o.user_id = u.id WHERE o.total > 100 GROUP BY u.id HAVING n >= 3;',
  'template <typename T, size_t N>\nconstexpr std::array<T, N> make() noexcept { return {}; }\n// TODO(someone): fix\n',
  'fn main() -> Result<(), Box<dyn Error>> {\n    let v: Vec<u8> = vec![0xFF; 16];\n    println!("{:?}", &v[..4]);\n    Ok(())\n}',
  'x = [i**2 for i in range(10) if i % 2 == 0]  # squares\r\nprint(f"{x!r:>20}")\r\n',
  'if (a && b || !c) { x += y << 2; z ^= ~w; } else if (p != q) { r = s ? t : u; }',
  '    \t  indented with mixed tabs   \n\t\tand more\n        spaces\n',
  'https://example.com/path/to/page?query=1&lang=en#section-2 mailto:someone@example.org',
  'C:\\Users\\name\\Documents\\file (1).txt /usr/local/bin/python3.11 ~/.config/app/settings.json',
  '```python\nimport numpy as np\narr = np.zeros((3, 4), dtype=np.float32)\n```',
  '0x7fffffff 0b1010 0o755 1e-9 3.14f 1_000_000 -42 +7 .5 5. 1..10',
  '/* comment */ // line comment\n-- sql comment\n# shell comment\n<!-- html comment -->',
  'a=1;b=2;c=a+b;d=c*2;e=d/3;f=e%4;g=f-5;h=g**6;i=h//7;j=i&8;k=j|9;l=k^10',
  '\\begin{equation} E = mc^2 \\end{equation} $\\alpha + \\beta_{i}^{2}$',
  '\'use strict\';\nmodule.exports = { a: \'b\', "c": `d${e}f` };',
];
code.forEach(add);

// Whitespace runs, ASCII and Unicode.
const spaces = [' ', '\t', '\n', '\r\n', '\r', '\u00a0', '\u2000', '\u2003', '\u2009', '\u200a',
  '\u3000', '\u180e', '\u0085', '\u2028', '\u2029', '\u200b', '\ufeff', '\u000b', '\u000c',
  '\u1680', '\u202f', '\u205f'];
for (const sp of spaces) {
  for (const n of [1, 2, 3, 7, 16]) {
    add(sp.repeat(n));
    add('a' + sp.repeat(n) + 'b');
    add('word' + sp.repeat(n));
    add(sp.repeat(n) + 'word');
    add('x' + sp.repeat(n) + '\n' + sp.repeat(n) + 'y');
  }
}
for (let i = 0; i < 60; ++i) {
  let s = '';
  const n = int(1, 12);
  for (let k = 0; k < n; ++k) {
    s += pick(spaces).repeat(int(1, 6));
    if (rand() < 0.5) s += pick(['a', 'Hello', '1', '!', 'é', '中', '😀', '.', '-']);
  }
  add(s);
}
add(' '.repeat(1000));
add('\n'.repeat(500));
add('\t'.repeat(300) + 'x');
add(' \n'.repeat(200));
add('a' + ' '.repeat(257) + 'b');

// Numbers.
const numbers = ['0', '7', '42', '123', '1234', '12345', '123456', '1234567890', '3.14159',
  '1,000,000', '-273.15', '6.022e23', '2024-01-31', '12:34:56', '+1 (555) 010-9999',
  '١٢٣٤٥٦', '०१२३४५६७८९', '１２３４５', '²³¹', 'Ⅻ', '½', '⁰¹²³⁴⁵⁶⁷⁸⁹', '₀₁₂',
  '9'.repeat(50), '1234567'.repeat(10), '3.'.repeat(20), 'v1.2.3-rc.4+build.5', 'IPv4 192.168.0.1'];
numbers.forEach(add);
for (let i = 0; i < 80; ++i) {
  const digits = int(1, 20);
  let s = '';
  for (let k = 0; k < digits; ++k) s += String(int(0, 9));
  add(pick(['', 'x', 'The answer is ', '$', '#', ' ']) + s + pick(['', '.', ' apples', 'px', '%', 'k']));
}

// Contractions and apostrophes (the regex is case-insensitive there).
const contractions = ["it's", "IT'S", "It'S", "don't", "DON'T", "we'll", "WE'LL", "they've", "THEY'VE",
  "I'm", "I'M", "you're", "YOU'RE", "he'd", "HE'D", "'s", "'t", "'re", "'ve", "'m", "'ll", "'d",
  "'S'T'RE'VE'M'LL'D", "rock 'n' roll", "''", "'", "' s", "'ſ", "it'ſ", "'ſt", "'K", "'\u212a",
  "it’s", "don’t", "l'homme", "aujourd'hui", "O'Neil's", "students' books", "'''", "x'y'z", "'123",
  "'é", "'中", "'😀", "can't've", "y'all'd've", "'LL'll'Ll'lL", "'Ss", "'ss", "'İ", "'ı"];
contractions.forEach(add);
for (let i = 0; i < 40; ++i) {
  add(pick(['It', 'She', 'We', 'They', 'I', 'You']) + pick(["'s", "'re", "'ve", "'ll", "'d", "'m", "'T", "'S"]) +
      ' ' + pick(['fine', 'here', 'gone', 'DONE', 'ok.', '42', 'été']));
}

// Emoji, ZWJ sequences, flags, modifiers.
const emoji = ['😀', '👍🏽', '👨‍👩‍👧‍👦', '🏳️‍🌈', '🇫🇷🇩🇪🇯🇵', '1️⃣', '#️⃣', '❤️', '🧑🏿‍🚀',
  '👩‍❤️‍💋‍👨', '🐈‍⬛', '🫠', '©️', '™', '☺', '🤷‍♀️', '🏴󠁧󠁢󠁳󠁣󠁴󠁿', '👁️‍🗨️'];
emoji.forEach(add);
for (let i = 0; i < 60; ++i) {
  let s = '';
  const n = int(1, 8);
  for (let k = 0; k < n; ++k) {
    s += pick(emoji);
    if (rand() < 0.4) s += pick([' ', '', 'a', 'Hello ', '!', '\n', '  ']);
  }
  add(s);
}

// Combining marks.
const combining = ['e\u0301', 'a\u0300\u0301\u0302', 'n\u0303o\u0308', '\u0301', '\u0301\u0301abc',
  'x\u20dd', '1\u20e3', '\u1100\u1161\u11a8', 'क\u094d\u0937', 'Z\u0351\u036b\u0343\u036a\u0302\u036b',
  'ô\u0323', 'i\u0307', 'A\u030a', ' \u0301', '\u0301 ', 'ab\u0300cd\u0301ef'];
combining.forEach(add);

// Special-token strings inside text.
const specials = ['<|begin_of_text|>', '<|end_of_text|>', '<|reserved_special_token_0|>',
  '<|reserved_special_token_5|>', '<|reserved_special_token_250|>', '<|start_header_id|>',
  '<|end_header_id|>', '<|eot_id|>', '<|eom_id|>', '<|python_tag|>', '<|finetune_right_pad_id|>'];
const nearSpecials = ['<|begin_of', '<|end_of_text', '|>', '<|', '<||>', '<|BEGIN_OF_TEXT|>',
  '< |eot_id|>', '<<|eot_id|>|>', '<|eot_id|><|eot_id|>', '<|reserved_special_token_999|>'];
for (const s of specials.concat(nearSpecials)) {
  add(s);
  add('Hello' + s + 'world');
  add('Hello ' + s + ' world');
  add(s + s);
  add('\n' + s + '\n');
}
add('<|start_header_id|>user<|end_header_id|>\n\nWhat is the capital of France?<|eot_id|>' +
    '<|start_header_id|>assistant<|end_header_id|>\n\nParis.<|eot_id|>');
for (let i = 0; i < 40; ++i) {
  let s = '';
  const n = int(1, 6);
  for (let k = 0; k < n; ++k) {
    s += pick(['text ', 'more', ' ', '\n', '😀', 'é', '123']) + pick(specials.concat(nearSpecials));
  }
  add(s);
}

// Empty, tiny, control characters.
['', ' ', 'a', 'A', '.', '\u0000', '\u0001\u0002\u0003', '\u007f', 'a\u0000b', '\ufeffBOM',
  '\u200d', '\u200c\u200d', '\ufffd', '\uffff', '\u{10ffff}', '\u{e0001}', '\u{1f9ff}', '\u0085x',
  '\u00ad', 'soft\u00adhyphen', '\u202eRTL override\u202c', '\u0600\u0601', '\u{e0100}'].forEach(add);

// Very long words (BPE on long pre-tokens).
add('a'.repeat(5000));
add('ab'.repeat(2000));
add('abc'.repeat(1500));
add('supercalifragilisticexpialidocious'.repeat(50));
add('Pneumonoultramicroscopicsilicovolcanoconiosis');
add('x'.repeat(65));
add('xy'.repeat(33));
add('!'.repeat(3000));
add('-='.repeat(700));
add('中'.repeat(2000));
add('😀'.repeat(500));
add('é'.repeat(1500));
add('Ä'.repeat(100) + 'ö'.repeat(100));
add('7'.repeat(4000));
add('Donaudampfschifffahrtselektrizitätenhauptbetriebswerkbauunterbeamtengesellschaft');
add('ลลลลลลลลลลลลลลลลลลลลลลลลลลลลลลลลลลลลลลลลลลลลลลลลลลลลลลลลล');
for (let i = 0; i < 40; ++i) {
  const alphabet = pick(['abcdefghijklmnopqrstuvwxyz', 'ABCDEFGHIJKLMNOPQRSTUVWXYZ', 'aeiouy',
    'абвгдеёжзийклмнопрстуфхцчшщъыьэюя', 'αβγδεζηθικλμνξοπρστυφχψω', 'あいうえおかきくけこ', '가나다라마바사',
    'éèêëàâäôöûüç', 'ㄱㄴㄷㄹ', 'ابتثجحخدذرزسشصضطظعغفقكلمنهوي']);
  const chars = Array.from(alphabet);
  let s = '';
  const n = pick([50, 65, 100, 300, 1000, 3000]);
  for (let k = 0; k < n; ++k) s += pick(chars);
  add(s);
}

// Random code points from assorted blocks (valid scalars only, no surrogates).
const blocks = [[0x20, 0x7e], [0xa0, 0x24f], [0x300, 0x36f], [0x370, 0x3ff], [0x400, 0x4ff],
  [0x590, 0x5ff], [0x600, 0x6ff], [0x900, 0x97f], [0xe00, 0xe7f], [0x1100, 0x11ff], [0x1e00, 0x1eff],
  [0x2000, 0x206f], [0x2070, 0x209f], [0x20a0, 0x20cf], [0x2100, 0x214f], [0x2190, 0x21ff],
  [0x2200, 0x22ff], [0x2460, 0x24ff], [0x2500, 0x257f], [0x3000, 0x303f], [0x3040, 0x30ff],
  [0x4e00, 0x9fff], [0xac00, 0xd7a3], [0xff00, 0xffef], [0x1f300, 0x1f6ff], [0x1f900, 0x1f9ff],
  [0x10000, 0x1007f], [0x1d400, 0x1d7ff], [0x20000, 0x2a6df],
  // Assigned after Unicode 14 (PCRE2 10.42's tables): Kawi, Nag Mundari,
  // CJK Ext. H and I, Garay, Todhri, Egyptian hieroglyphs ext. A.
  [0x11f00, 0x11f59], [0x1e4d0, 0x1e4f9], [0x31350, 0x323af], [0x2ebf0, 0x2ee5d],
  [0x10d40, 0x10d8f], [0x105c0, 0x105f3], [0x13460, 0x143fa]];
for (let i = 0; i < 250; ++i) {
  let s = '';
  const n = int(1, 40);
  const local = [pick(blocks), pick(blocks), pick(blocks)];
  for (let k = 0; k < n; ++k) {
    const [lo, hi] = rand() < 0.8 ? pick(local) : [0x20, 0x7e];
    s += String.fromCodePoint(int(lo, hi));
  }
  add(s);
}

// Any scalar value, assigned or not.
for (let i = 0; i < 100; ++i) {
  let s = '';
  const n = int(1, 30);
  for (let k = 0; k < n; ++k) {
    let cp = rand() < 0.5 ? int(0, 0xffff) : int(0, 0x10ffff);
    if (cp >= 0xd800 && cp <= 0xdfff) cp = 0x3d;
    s += rand() < 0.3 ? '=' : '';
    s += String.fromCodePoint(cp);
  }
  add(s);
}

// Mixes of everything, up to the target size.
const fragments = [].concat(multilingual.map(s => s.slice(0, 40)), code.map(s => s.slice(0, 30)),
  numbers, contractions, emoji, combining, specials, nearSpecials, [' ', '  ', '\n', '\t', '\r\n', '\n\n']);
const words = ['the', 'The', ' the', 'cat', 'Paris', 'capital', 'of', 'France', 'and', 'is', 'a',
  'blue', 'green', 'red', 'seven', '42', 'dog', 'city', 'hello', 'world', 'HELLO', 'World'];
while (out.length < target) {
  let s = '';
  const n = int(1, 25);
  for (let k = 0; k < n; ++k) {
    const r = rand();
    if (r < 0.45) s += pick(words) + pick([' ', ' ', ', ', '. ', '\n', '']);
    else if (r < 0.8) s += pick(fragments);
    else s += pick(spaces).repeat(int(1, 4));
  }
  add(s);
}

// Sanity: no lone surrogates (JSON would carry them, UTF-8 cannot).
for (const s of out) {
  if (/[\ud800-\udbff](?![\udc00-\udfff])|(?<![\ud800-\udbff])[\udc00-\udfff]/.test(s)) {
    throw new Error('lone surrogate in corpus: ' + JSON.stringify(s));
  }
}
process.stdout.write(out.map(s => JSON.stringify({text: s})).join('\n') + '\n');
