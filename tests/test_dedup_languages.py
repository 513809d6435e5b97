"""Near-dedup and decontamination in languages written without spaces between words.

A one-character edit of a Chinese, Japanese, Thai or Korean paragraph (or of Chinese mixed with
English and code) is a near duplicate, as a one-word edit is in English; distinct texts are not;
English text gives the same shingles as before the change.
"""

import random

import pytest

from tuneline.curate.clean import run_clean
from tuneline.curate.dedup import NearDedup
from tuneline.curate.shingles import ngram_hashes, word_hashes
from tuneline.curate.split import run_split
from tuneline.recipe import CleanSpec, SplitSpec
from tuneline.records import make_record
from tuneline.store import find_stage, iter_records, read_manifest, write_stage

CHINESE = (
    "长城是中国古代的军事防御工程，东起山海关，西至嘉峪关，全长两万多公里。它修建于两千多年前的春秋战国时期，"
    "历代王朝不断加固和延长。长城不仅是重要的历史遗迹，也是中华民族精神的象征，每年吸引数以百万计的游客前来参观。"
    "一九八七年，长城被列入世界文化遗产名录。"
)
CHINESE_OTHER = (
    "熊猫是中国特有的珍稀动物，主要生活在四川、陕西和甘肃的山区竹林中。它们每天要花十几个小时吃竹子，"
    "成年熊猫的体重可以达到一百多公斤。由于栖息地减少，熊猫曾经濒临灭绝，经过多年的保护工作，"
    "野生熊猫的数量已经逐渐回升。"
)
JAPANESE = (
    "富士山は日本で最も高い山で、標高は三千七百七十六メートルです。静岡県と山梨県にまたがる活火山で、"
    "最後に噴火したのは一七〇七年です。夏の登山シーズンには多くの人が山頂を目指し、ご来光を見るために"
    "夜から登り始めます。二〇一三年に世界文化遺産に登録されました。"
)
THAI = (
    "กรุงเทพมหานครเป็นเมืองหลวงของประเทศไทยและเป็นเมืองที่มีประชากรมากที่สุดในประเทศ "
    "เมืองนี้ตั้งอยู่ริมแม่น้ำเจ้าพระยาและมีวัดวาอารามที่สวยงามมากมาย "
    "นักท่องเที่ยวจากทั่วโลกเดินทางมาเยี่ยมชมพระบรมมหาราชวังและตลาดน้ำทุกปี "
    "อาหารริมทางของกรุงเทพก็มีชื่อเสียงไปทั่วโลกเช่นกัน"
)
KOREAN = (
    "서울은 대한민국의 수도이며 가장 큰 도시입니다. 한강이 도시의 중심을 가로질러 흐르고 "
    "있으며, 경복궁과 같은 역사적인 궁궐이 많이 남아 있습니다. 서울에는 천만 명에 가까운 "
    "사람들이 살고 있고, 지하철과 버스 같은 대중교통이 매우 잘 발달되어 있습니다. 매년 많은 "
    "관광객이 서울을 찾아 음식과 문화를 즐깁니다."
)
MIXED = (
    "在Python中，可以使用pandas库读取CSV文件。首先导入库：import pandas as pd，"
    "然后调用pd.read_csv('data.csv')得到一个DataFrame对象。接着可以用df.head()查看前五行数据，用df.describe()查看统计摘要。"
    "如果文件很大，可以设置chunksize参数分块读取，避免内存不足。"
)

# (original, the same text with one character changed, a distinct text in the same language)
CASES = {
    "chinese": (CHINESE, CHINESE.replace("两万多", "两千多"), CHINESE_OTHER),
    "japanese": (JAPANESE, JAPANESE.replace("多くの人", "多くの方"), CHINESE),
    "thai": (THAI, THAI.replace("สวยงาม", "สวยงาน"), JAPANESE),
    "korean": (KOREAN, KOREAN.replace("많은 관광객", "적은 관광객"), THAI),
    "mixed": (MIXED, MIXED.replace("前五行", "前十行"), CHINESE),
}


@pytest.mark.parametrize("language", sorted(CASES))
def test_one_character_edit_is_a_near_duplicate_and_a_distinct_text_is_not(language):
    original, edited, distinct = CASES[language]
    assert sum(a != b for a, b in zip(original, edited, strict=True)) == 1
    spec = CleanSpec()  # the clean stage's defaults: threshold 0.8, 5-token shingles, 64 permutations
    near = NearDedup(spec.near_dedup_threshold, spec.near_dedup_ngram, spec.near_dedup_permutations)
    assert near.flags([original, distinct, edited]) == [False, False, True]


def test_characters_of_unspaced_scripts_are_tokens_and_their_punctuation_separates():
    texts = ["细胞理论。", "使用Python的pandas库：df.head()", "コーヒー、", "ไม่มี", "ＡＢＣ，ok"]
    _, offsets = word_hashes(texts)
    # 细 胞 理 论 | 使 用 python 的 pandas 库 df head | コ ー ヒ ー | ไ ม่ มี (tone and vowel marks stay
    # with their consonant) | ＡＢＣ ok
    assert offsets.tolist() == [0, 4, 12, 16, 19, 21]


def test_english_shingles_are_unchanged():
    """The hashes of space-separated text (also with curly quotes, dashes and accents, which stay
    part of a word as before) are those computed before scripts were told apart."""
    hashes, _ = word_hashes(["Hello, World! It’s “café”—time 42.", "x"])
    assert hashes.tolist() == [
        12630194143097082991,
        14958284276721229367,
        6662317291147308245,
        4540544474241085856,
        56075093038814,
        121,
    ]
    trigrams, _ = ngram_hashes(["Hello, World! It’s “café”—time 42."], 3, False, 2)
    assert trigrams.tolist() == [7670728958929624907, 17459919564900420240, 11826815428126780191]


def conversation(user, assistant):
    return make_record([{"role": "user", "content": user}, {"role": "assistant", "content": assistant}])


def random_chinese(rng, length):
    return "".join(chr(rng.randrange(0x4E00, 0x9FA5)) for _ in range(length))


def test_chinese_record_sharing_a_passage_with_a_held_out_one_is_decontaminated_boilerplate_is_not(tmp_path):
    rng = random.Random(0)
    greeting = "您好，我是一个由小明开发的人工智能助手。"  # shared boilerplate, 17 characters, is not a copy
    near = [conversation(f"第{i}个问题：介绍一下长城。", greeting + CHINESE) for i in range(30)]
    distinct = [conversation(random_chinese(rng, 9), greeting + random_chinese(rng, 60)) for _ in range(30)]
    with write_stage(tmp_path, "gate", "in") as writer:
        for record in near + distinct:
            writer.count_in()
            writer.keep(record)
    ref = run_split(tmp_path, find_stage(tmp_path, "gate", "in"), SplitSpec(validation=0.2, test=0.2))
    held_out = {r["id"] for name in ("validation", "test") for r in iter_records(ref, f"{name}.jsonl")}
    train = {r["id"] for r in iter_records(ref, "train.jsonl")}
    near_in_train = [r for r in near if r["id"] not in held_out]
    assert held_out & {r["id"] for r in near} and near_in_train
    assert read_manifest(ref)["ledger"]["dropped"] == {"contaminated": len(near_in_train)}
    assert train == {r["id"] for r in distinct} - held_out
    assert "contaminated" in ref.file("rejects.jsonl").read_text()


def test_clean_drops_the_edited_chinese_copy_as_near_duplicate(tmp_path):
    original, edited, distinct = CASES["chinese"]
    records = [conversation("介绍一下长城。", original), conversation("介绍一下熊猫。", distinct)]
    records.append(conversation("介绍一下长城。", edited))
    with write_stage(tmp_path, "collect", "in") as writer:
        for record in records:
            writer.count_in()
            writer.keep(record)
    ref = run_clean(tmp_path, find_stage(tmp_path, "collect", "in"), CleanSpec())
    assert read_manifest(ref)["ledger"] == {"in": 3, "out": 2, "dropped": {"near_duplicate": 1}}
    assert "两千多公里" in ref.file("rejects.jsonl").read_text()
